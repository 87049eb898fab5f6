"""IndexVideo through the real server: an object found in the seconds it appears, grouping, atomic
re-indexing, media-root escapes, corrupt video, and the CLI's time codes."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from media import OBJECT_SIZE, jpeg, object_video, resized, scenes_video, the_object
from servers import running_server
from skimage import data

from inserve.clients.client import InstanceSearchClient, VideoItem
from inserve.server.stages.nms import box_iou

OBJECT_SECONDS = {1, 2, 4}
CAT_BOX = (40.0, 70.0, 40.0 + OBJECT_SIZE[0] + 28, 70.0 + OBJECT_SIZE[1])  # where the cat drifts within a second


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("media")
    object_video(root / "object.mp4", seconds=6, object_seconds=OBJECT_SECONDS)
    scenes_video(root / "scenes.mp4", [data.astronaut(), data.coffee(), resized(the_object(), (451, 300))])
    (root.parent / "outside.mp4").write_bytes((root / "scenes.mp4").read_bytes())
    os.symlink(root.parent / "outside.mp4", root / "link.mp4")
    return root


@pytest.fixture(scope="module")
def server(models_dir: Path, media: Path, tmp_path_factory: pytest.TempPathFactory):
    data_dir = tmp_path_factory.mktemp("video-data")
    with running_server(models_dir, data_dir, "--recipe", "dasr_star", "--media-root", str(media)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    with InstanceSearchClient(server.address, timeout=300) as c:
        c.wait_ready()
        yield c


@pytest.fixture(scope="module")
def indexed(client: InstanceSearchClient, media: Path) -> list:
    """The object video uploaded in chunks, a keyframe at least every second."""
    video = VideoItem("object", file=media / "object.mp4", max_interval_s=1.0)
    return list(client.index_video(video, chunk_bytes=16 << 10))


def cat_query(client: InstanceSearchClient, **kwargs: object) -> list:
    return client.search(jpeg(the_object()), top_k=20, **kwargs)


def test_progress_ends_with_every_keyframe_committed(indexed: list) -> None:
    last = indexed[-1]
    assert last.done and not any(p.done for p in indexed[:-1])
    assert last.video_id == "object" and last.frames_decoded == 48
    assert last.keyframes_selected == last.keyframes_indexed >= 6  # one a second at least
    assert last.regions >= last.keyframes_indexed
    assert last.duration_s == pytest.approx(47 / 8)
    assert last.replaced == 0


def test_the_object_is_found_in_the_seconds_it_appears_first(client: InstanceSearchClient, indexed: list) -> None:
    hits = [h for h in cat_query(client) if h.keyframe.video_id == "object"]
    assert len(hits) == indexed[-1].keyframes_indexed
    seconds = [int(h.keyframe.time_s) for h in hits]
    with_object = [s in OBJECT_SECONDS for s in seconds]
    assert with_object == sorted(with_object, reverse=True), f"ranked seconds {seconds}"
    assert {s for s, w in zip(seconds, with_object) if w} == OBJECT_SECONDS
    top = hits[0]
    assert top.id == f"object#{top.keyframe.frame}" and top.keyframe.frame == round(top.keyframe.time_s * 8)
    assert (top.width, top.height) == (320, 240)
    box = np.array([[top.box.x1, top.box.y1, top.box.x2, top.box.y2]])
    assert box_iou(box, np.array([CAT_BOX]))[0, 0] > 0.4


def test_grouping_per_video_and_per_shot(client: InstanceSearchClient, media: Path, indexed: list) -> None:
    scenes = list(client.index_video(VideoItem("scenes", server_path="scenes.mp4")))
    assert scenes[-1].shots == 3 and scenes[-1].keyframes_indexed == 3
    every = cat_query(client)
    per_video = cat_query(client, group="video")
    per_shot = cat_query(client, group="shot")
    assert len(per_video) == 2 and {h.keyframe.video_id for h in per_video} == {"object", "scenes"}
    assert per_video[0].id == every[0].id  # a video's entry is its best keyframe
    shots = [(h.keyframe.video_id, h.keyframe.shot) for h in per_shot]
    assert len(shots) == len(set(shots)) == 1 + 3  # the object video is one shot, the scenes video three
    assert next(h for h in per_shot if h.keyframe.video_id == "scenes").keyframe.shot == 2  # the cat scene
    assert len(every) > len(per_shot)


def test_reindexing_replaces_the_keyframes_and_the_old_stay_searchable_until_then(
    server, client: InstanceSearchClient, media: Path, indexed: list
) -> None:
    old = {h.id for h in cat_query(client) if h.keyframe.video_id == "object"}
    seen_during: list[set[str]] = []
    done = threading.Event()

    def search_meanwhile() -> None:
        with InstanceSearchClient(server.address, timeout=120) as other:
            while not done.is_set():
                seen_during.append({h.id for h in cat_query(other) if h.keyframe.video_id == "object"})

    watcher = threading.Thread(target=search_meanwhile)
    watcher.start()
    try:
        progress = list(client.index_video(VideoItem("object", file=media / "object.mp4", max_interval_s=3.0)))
    finally:
        done.set()
        watcher.join(120)
    new = {h.id for h in cat_query(client) if h.keyframe.video_id == "object"}
    assert progress[-1].replaced == len(old) and progress[-1].keyframes_indexed == len(new) < len(old)
    assert seen_during and all(ids in (old, new) for ids in seen_during)  # never a mix, never empty
    assert client.stats().keyframes == len(new) + 3  # and the scenes video's three
    list(client.index_video(VideoItem("object", file=media / "object.mp4", max_interval_s=1.0)))  # as before


def test_a_new_video_is_searchable_while_it_is_indexed_and_keeps_what_was_committed_when_cancelled(
    client: InstanceSearchClient, tmp_path: Path, indexed: list
) -> None:
    long = object_video(tmp_path / "long.mp4", seconds=24, object_seconds={0, 1})
    before = client.stats().keyframes
    progress = client.index_video(VideoItem("long", file=long, max_interval_s=0.5))  # about 48 keyframes
    for update in progress:
        if update.keyframes_committed and not update.done:
            committed = update.keyframes_committed
            hits = [h for h in cat_query(client) if h.keyframe.video_id == "long"]
            break
    progress.close()  # the caller goes away half-way; the server stops at its next frame
    kept = settled_keyframes(client) - before
    assert hits and int(hits[0].keyframe.time_s) in {0, 1}  # searchable before the end
    assert committed <= kept < 40
    assert client.delete(["long"]).deleted == 1


def settled_keyframes(client: InstanceSearchClient) -> int:
    """The keyframe count once it has not changed for half a second (a cancelled video has stopped)."""
    counts = [client.stats().keyframes]
    while len(counts) < 2 or counts[-1] != counts[-2]:
        time.sleep(0.5)
        counts.append(client.stats().keyframes)
    return counts[-1]


def refused(client: InstanceSearchClient, video: VideoItem) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        list(client.index_video(video))
    return caught.value.code()


@pytest.mark.parametrize("path", ["../outside.mp4", "link.mp4", "/etc/hostname", "sub/../../outside.mp4"])
def test_paths_outside_the_media_root_are_permission_denied(client: InstanceSearchClient, path: str) -> None:
    assert refused(client, VideoItem("escape", server_path=path)) == grpc.StatusCode.PERMISSION_DENIED


def test_corrupt_or_truncated_video_is_invalid_and_changes_nothing(
    client: InstanceSearchClient, media: Path, tmp_path: Path, indexed: list
) -> None:
    before = client.stats()
    before_hits = [(h.id, round(h.score, 4)) for h in cat_query(client)]
    good = (media / "object.mp4").read_bytes()
    bad = {
        "truncated.mp4": good[: len(good) // 2],
        "random.mp4": np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes(),
        "still.jpg": jpeg(the_object()),
    }
    for name, content in bad.items():
        (tmp_path / name).write_bytes(content)
        for video_id in ("object", "new-video"):  # re-indexing an existing video fails the same way
            assert refused(client, VideoItem(video_id, file=tmp_path / name)) == grpc.StatusCode.INVALID_ARGUMENT
    after = client.stats()
    assert (after.images, after.regions, after.videos, after.keyframes) == (
        before.images,
        before.regions,
        before.videos,
        before.keyframes,
    )
    assert [(h.id, round(h.score, 4)) for h in cat_query(client)] == before_hits


def test_the_cli_indexes_videos_and_prints_time_codes(server, tmp_path: Path, media: Path, indexed: list) -> None:
    cli = [sys.executable, "-m", "inserve.clients.cli"]
    run = subprocess.run(
        [*cli, "index-video", "--server", server.address, "--id-prefix", "cli-", str(media / "scenes.mp4")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "cli-scenes.mp4: 48 frames (5.9 s), 3 shots, 3 keyframes" in run.stdout
    (tmp_path / "cat.jpg").write_bytes(jpeg(the_object()))
    show = tmp_path / "hits.png"
    search = [*cli, "search", "--server", server.address, str(tmp_path / "cat.jpg"), "--top-k", "3"]
    run = subprocess.run(
        [*search, "--group", "video", "--show", str(show)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert any("object @ 00:00:0" in line and "frame " in line and "shot 0" in line for line in lines[:3]), lines
    assert show.stat().st_size > 1000
    client_ids = {line.split()[2] for line in lines[:3]}
    assert {"object", "scenes", "cli-scenes.mp4"} >= client_ids


def test_images_and_videos_share_one_namespace_and_every_keyframe_id_is_deletable(
    client: InstanceSearchClient, indexed: list
) -> None:
    from inserve.clients.client import ImageItem

    with pytest.raises(grpc.RpcError) as caught:  # undecodable bytes: refused for the id before any decoding
        list(client.index_images([ImageItem("object", b"not an image", replace=True)]))
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "a video is indexed under this id" in caught.value.details()

    long_id = "k" * 512  # its keyframe ids are longer than any id a caller may choose, and still deletable
    before = client.stats().keyframes
    progress = list(client.index_video(VideoItem(long_id, server_path="scenes.mp4")))
    assert client.stats().keyframes == before + progress[-1].keyframes_indexed > before + 1
    one = client.delete([f"{long_id}#0"])
    assert (one.deleted, list(one.missing)) == (1, []) and client.stats().keyframes == before + progress[
        -1
    ].keyframes_indexed - 1
    rest = client.delete([long_id])  # the video's other keyframes, counted as the one id given
    assert (rest.deleted, list(rest.missing)) == (1, []) and client.stats().keyframes == before
