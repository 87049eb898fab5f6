"""IndexLiveStream through the real server: every acknowledged keyframe searchable at once, resumption without
indexing anything twice (after a cancelled call and after a SIGKILLed server), bad frames rejected while the
stream goes on, one connection per stream id, and the overload policies."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from media import jpeg, object_video, the_object
from servers import metrics_port, running_server, scrape

from inserve.clients.client import ImageItem, InstanceSearchClient, LiveStreamSpec, VideoItem
from inserve.clients.ingest import LiveIngest, source_frames
from inserve.v1 import inserve_pb2 as pb

FPS = 8


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return object_video(tmp_path_factory.mktemp("live") / "object.mp4", seconds=6, object_seconds={1, 2, 4}, fps=FPS)


@pytest.fixture(scope="module")
def frames(video: Path) -> list[pb.LiveFrame]:
    return list(source_frames(str(video)))


@pytest.fixture(scope="module")
def server(models_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    flags = ("--recipe", "gem", "--metrics-port", "0")
    with running_server(models_dir, tmp_path_factory.mktemp("live-data"), *flags) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    with InstanceSearchClient(server.address, timeout=300) as c:
        c.wait_ready()
        yield c


def events(client: InstanceSearchClient, stream: LiveStreamSpec, frames: list[pb.LiveFrame]) -> list:
    return list(client.index_live_stream(stream, lambda opened: frames))


def events_once_released(client: InstanceSearchClient, stream: LiveStreamSpec, frames: list[pb.LiveFrame]) -> list:
    """`events` for a stream whose previous connection was just cut: the server releases it when it notices,
    and until then answers ABORTED "retry shortly", as a client is told to do."""
    deadline = time.monotonic() + 10
    while True:
        try:
            return events(client, stream, frames)
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.ABORTED or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def kinds(events: list, kind: str) -> list:
    return [getattr(e, kind) for e in events if e.WhichOneof("event") == kind]


def test_the_source_frames_carry_their_presentation_times(frames: list[pb.LiveFrame]) -> None:
    assert len(frames) == 6 * FPS
    assert [f.time_s for f in frames] == pytest.approx([i / FPS for i in range(6 * FPS)])
    assert all(f.WhichOneof("pixels") == "image" and f.image[:2] == b"\xff\xd8" for f in frames)


def test_each_keyframe_is_searchable_when_it_is_acknowledged(
    client: InstanceSearchClient, frames: list[pb.LiveFrame]
) -> None:
    by_time = {f.time_s: f for f in frames}
    stream = LiveStreamSpec("cam-a", source="rtsp://cam-a", metadata={"site": "gate"}, max_interval_s=1.0)
    seen = []
    for event in client.index_live_stream(stream, lambda opened: frames):
        kind = event.WhichOneof("event")
        if not seen:
            assert kind == "opened" and event.opened.keyframes == 0 and not event.opened.HasField("resume_after_s")
        seen.append(event)
        if kind == "keyframe":
            ack = event.keyframe
            (hit,) = client.search(by_time[ack.keyframe.time_s].image, top_k=1)  # before the stream goes on
            assert hit.id == ack.id
            assert (hit.keyframe.video_id, hit.keyframe.time_s) == ("cam-a", ack.keyframe.time_s)
            assert (hit.source, dict(hit.metadata)) == ("rtsp://cam-a", {"site": "gate"})
    acks = kinds(seen, "keyframe")
    times = [a.keyframe.time_s for a in acks]
    assert times[0] == 0.0 and times == sorted(times) and len(acks) >= 6  # one a second at least
    assert all(a.id == f"cam-a#{round(a.keyframe.time_s * 1000)}" == f"cam-a#{a.keyframe.frame}" for a in acks)
    assert all(0 < a.latency_s < 60 for a in acks)
    assert not kinds(seen, "dropped") and not kinds(seen, "rejected")
    hits = client.search(jpeg(the_object()), top_k=3)
    assert int(hits[0].keyframe.time_s) in {1, 2, 4}


def test_the_metrics_count_each_keyframe_with_its_latency(server, client: InstanceSearchClient, frames) -> None:
    before = scrape(metrics_port(server))
    acks = kinds(events(client, LiveStreamSpec("cam-m", max_interval_s=1.0), frames[:17]), "keyframe")
    after = scrape(metrics_port(server))
    count, total = (("inserve_live_keyframe_seconds_" + name, ()) for name in ("count", "sum"))
    assert after[count] - before[count] == len(acks) >= 3  # 0, 1 and 2 s at least
    assert after[total] - before[total] == pytest.approx(sum(a.latency_s for a in acks), rel=1e-6)


def test_a_reopened_stream_continues_after_its_last_keyframe_and_indexes_nothing_twice(
    client: InstanceSearchClient, frames: list[pb.LiveFrame]
) -> None:
    stream = LiveStreamSpec("cam-b", max_interval_s=1.0)
    first = []
    for event in client.index_live_stream(stream, lambda opened: frames):
        first.append(event)
        if len(kinds(first, "keyframe")) == 3:
            break  # the connection is cancelled: a broken stream
    again = events_once_released(client, stream, frames)  # sent again from the start
    (opened,) = kinds(again, "opened")
    stored = client.stats().keyframes
    assert opened.keyframes >= 3 and opened.resume_after_s >= kinds(first, "keyframe")[-1].keyframe.time_s
    later = kinds(again, "keyframe")
    assert later and all(a.keyframe.time_s > opened.resume_after_s for a in later)
    ids = [a.id for a in kinds(first, "keyframe") + later]
    assert len(ids) == len(set(ids))
    assert kinds(events(client, stream, frames), "keyframe") == []  # everything is stored: nothing new
    assert client.stats().keyframes == stored


def test_bad_frames_are_rejected_and_the_stream_goes_on(
    client: InstanceSearchClient, frames: list[pb.LiveFrame]
) -> None:
    raw = pb.RawPixels(width=32, height=24, format=pb.PIXEL_FORMAT_GRAY8, data=bytes(32 * 24))
    sent = [
        frames[0],
        pb.LiveFrame(time_s=0.0, image=frames[1].image),  # not after the previous frame
        pb.LiveFrame(time_s=0.05, raw=pb.RawPixels(width=32, height=24, format=pb.PIXEL_FORMAT_RGB24, data=b"x")),
        pb.LiveFrame(time_s=0.06, raw=pb.RawPixels(width=32, height=24, data=bytes(32 * 24 * 3))),  # no format
        pb.LiveFrame(time_s=0.065, raw=pb.RawPixels(width=32, height=24, format=99, data=bytes(32 * 24 * 3))),
        pb.LiveFrame(time_s=0.07, image=b"not an image"),
        pb.LiveFrame(time_s=0.08),  # no pixels
        pb.LiveFrame(time_s=float("nan"), image=frames[1].image),
        pb.LiveFrame(time_s=3.0, raw=raw),  # a keyframe (max interval), from grey pixels
    ]
    got = events(client, LiveStreamSpec("cam-c", max_interval_s=1.0), sent)
    rejected = kinds(got, "rejected")
    assert [r.error_code for r in rejected] == [grpc.StatusCode.INVALID_ARGUMENT.value[0]] * 7
    reasons = [r.error for r in rejected]
    assert "does not come after the previous frame's 0.0" in reasons[0]
    assert "take 2304 bytes, got 1" in reasons[1]
    assert "unknown pixel format 'unspecified'" in reasons[2]
    assert "unknown pixel format '99'; choose one of rgb24, bgr24, gray8" in reasons[3]  # not in the proto
    assert "cannot decode image" in reasons[4]
    assert "neither an image nor raw pixels" in reasons[5]
    assert "frame time must be a number" in reasons[6]
    assert [a.keyframe.time_s for a in kinds(got, "keyframe")] == [0.0, 3.0]


def test_client_keyframes_index_exactly_the_marked_frames(
    client: InstanceSearchClient, frames: list[pb.LiveFrame]
) -> None:
    marked = [pb.LiveFrame(time_s=f.time_s, image=f.image, keyframe=i % 10 == 3) for i, f in enumerate(frames)]
    got = events(client, LiveStreamSpec("cam-d", client_keyframes=True), marked)
    assert [a.keyframe.time_s for a in kinds(got, "keyframe")] == [f.time_s for f in marked if f.keyframe]


def test_every_client_keyframe_gets_an_answer_even_where_milliseconds_round_alike(
    client: InstanceSearchClient, frames: list[pb.LiveFrame]
) -> None:
    """0.0015 and 0.0025 s both round to 2 ms under round-half-even; the ids must differ, and a keyframe whose
    millisecond is taken is rejected, never left without an answer."""
    times = [0.0015, 0.0025, 0.0035, 0.0039]  # ids 2, 3, 4; the last falls in 4's millisecond
    sent = [pb.LiveFrame(time_s=t, image=frames[0].image, keyframe=True) for t in times]
    got = events(client, LiveStreamSpec("cam-ms", client_keyframes=True), sent)
    acknowledged = kinds(got, "keyframe")
    assert [a.keyframe.time_s for a in acknowledged] == times[:3]
    assert [a.id for a in acknowledged] == ["cam-ms#2", "cam-ms#3", "cam-ms#4"]
    (rejected,) = kinds(got, "rejected")
    assert rejected.time_s == 0.0039 and "falls in the millisecond of the one at 0.0035 s" in rejected.error


def test_one_connection_per_stream_and_ids_held_by_images_or_video_files_are_refused(
    client: InstanceSearchClient, frames: list[pb.LiveFrame], video: Path
) -> None:
    release = threading.Event()
    started = threading.Event()

    def held() -> object:
        started.set()
        release.wait(60)
        yield from frames[:1]

    first = client.index_live_stream(LiveStreamSpec("cam-e"), lambda opened: held())
    assert next(first).WhichOneof("event") == "opened"
    started.wait(30)
    with pytest.raises(grpc.RpcError) as busy:
        events(client, LiveStreamSpec("cam-e"), frames[:1])
    assert busy.value.code() == grpc.StatusCode.ABORTED and "another connection" in busy.value.details()
    with pytest.raises(grpc.RpcError) as replaced:
        list(client.index_video(VideoItem("cam-e", file=video)))
    assert replaced.value.code() == grpc.StatusCode.ALREADY_EXISTS and "live stream" in replaced.value.details()
    release.set()
    assert [e.WhichOneof("event") for e in first] == ["keyframe"]

    list(client.index_images([ImageItem("photo-f", jpeg(the_object()))]))
    list(client.index_video(VideoItem("file-g", file=video)))
    for taken, reason in (("photo-f", "an image is indexed"), ("file-g", "a video file is indexed")):
        with pytest.raises(grpc.RpcError) as refused:
            events(client, LiveStreamSpec(taken), frames[:1])
        assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS and reason in refused.value.details()


def test_overload_drop_drops_unmarked_frames_and_wait_drops_none(
    models_dir: Path, tmp_path: Path, frames: list[pb.LiveFrame]
) -> None:
    many = [pb.LiveFrame(time_s=i / 100, image=frames[i % len(frames)].image) for i in range(200)]
    spec = dict(min_interval_s=0.0, max_interval_s=0.005)  # every frame is a keyframe
    with (
        running_server(models_dir, tmp_path, "--recipe", "gem", "--live-window", "1") as server,
        InstanceSearchClient(server.address, timeout=300) as client,
    ):
        dropping = events(client, LiveStreamSpec("drop", overload="drop", **spec), many)
        waiting = events(client, LiveStreamSpec("wait", overload="wait", **spec), many)
    dropped = sum(d.frames for d in kinds(dropping, "dropped"))
    assert dropped > 0 and len(kinds(dropping, "keyframe")) + dropped == len(many)
    assert not kinds(waiting, "dropped") and len(kinds(waiting, "keyframe")) == len(many)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ingest_reconnects_to_a_restarted_server_and_keeps_every_acknowledged_keyframe(
    models_dir: Path, tmp_path: Path, frames: list[pb.LiveFrame]
) -> None:
    port = free_port()
    flags = ("--recipe", "gem", "--port", str(port))
    acked: list[str] = []
    opened: list[pb.LiveStreamOpened] = []
    with InstanceSearchClient(f"127.0.0.1:{port}", timeout=300) as client:
        with running_server(models_dir, tmp_path, *flags) as server:
            ingest = LiveIngest(client, LiveStreamSpec("cam-h", max_interval_s=1.0), frames, backoff_s=0.5, retries=40)
            stream = ingest.events()
            for event in stream:
                opened += kinds([event], "opened")
                acked += [a.id for a in kinds([event], "keyframe")]
                if len(acked) == 3:
                    server.process.kill()  # SIGKILL mid-stream
                    server.process.wait()
                    break
        with running_server(models_dir, tmp_path, *flags):
            for event in stream:
                opened += kinds([event], "opened")
                acked += [a.id for a in kinds([event], "keyframe")]
            stored = {h.id for h in client.search(frames[0].image, top_k=100) if h.keyframe.video_id == "cam-h"}
    assert ingest.reconnections >= 1 and len(opened) == 2 and opened[1].keyframes >= 3
    assert len(acked) == len(set(acked)) and set(acked) <= stored


SHARED_VIDEO = Path(__file__).resolve().parents[3] / "shared" / "data" / "videos" / "bikes.mp4"  # 10 s, 25 fps


@pytest.mark.skipif(not SHARED_VIDEO.exists(), reason=f"{SHARED_VIDEO} is not beside the checkout")
def test_the_ingest_command_plays_a_video_in_real_time_and_its_frames_are_found_while_it_runs(
    server, client: InstanceSearchClient
) -> None:
    command = [sys.executable, "-m", "inserve.clients.cli", "ingest", str(SHARED_VIDEO), "--stream-id", "bikes"]
    command += ["--realtime", "--quiet", "--server", server.address]
    first = next(source_frames(str(SHARED_VIDEO)))
    started = time.monotonic()
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as ingest:
        while not any(h.id == "bikes#0" for h in client.search(first.image, top_k=1)):
            assert ingest.poll() is None and time.monotonic() - started < 60
            time.sleep(0.2)
        assert ingest.poll() is None  # found while the stream still runs
        output, _ = ingest.communicate(timeout=120)
    assert ingest.returncode == 0, output
    assert time.monotonic() - started >= 9.5  # at the video's own pace: 10 s
    summary = re.search(r"bikes: (\d+) keyframes .* 0 frames dropped, 0 rejected, 0 reconnections", output)
    assert summary and int(summary.group(1)) >= 5, output  # a keyframe every 2 s at least
