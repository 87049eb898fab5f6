"""Configured limits on the real server: concurrent calls, streams per connection and the per-request
deadline each refuse with their own status code, and the server serves again once the load is gone.
(Message size, pixel limit and video upload size: test_bad_input.py; queue depth: test_streaming.py.)"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from photos import encode, photo
from servers import running_server

from inserve.v1 import inserve_pb2 as pb
from inserve.v1 import inserve_pb2_grpc as pb_grpc

FLAGS = ("--recipe", "gem", "--max-concurrent-rpcs", "3", "--max-streams-per-connection", "1")
FLAGS += ("--request-deadline", "0.001")  # no image can be described that fast
FLAGS += ("--stream-idle-timeout", "8")  # longer than the held streams are held; streams of 3 slots: 2


def held(release: threading.Event) -> Iterator[pb.IndexImageRequest]:
    """An IndexImages request stream that stays open, sending nothing, until released."""
    release.wait(60)
    yield from ()


@pytest.fixture(scope="module")
def server(models_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    with running_server(models_dir, tmp_path_factory.mktemp("limits-data"), *FLAGS) as running:
        yield running


def stats(channel: grpc.Channel, timeout: float = 10) -> pb.Stats:
    return pb_grpc.InstanceSearchStub(channel).GetStats(pb.GetStatsRequest(), timeout=timeout)


def test_calls_beyond_the_limits_are_refused_until_the_load_is_gone(server) -> None:
    release = threading.Event()
    own_connection = [("grpc.use_local_subchannel_pool", 1)]  # else channels to one address share a connection
    channels = [grpc.insecure_channel(server.address, options=own_connection) for _ in range(4)]
    try:
        for channel in channels:
            grpc.channel_ready_future(channel).result(timeout=30)
        streams = [pb_grpc.InstanceSearchStub(c).IndexImages(held(release), timeout=60) for c in channels[:3]]
        time.sleep(1.0)  # the streams are open on the server, in whatever order they arrived
        refused = [i for i, stream in enumerate(streams) if stream.done()]  # two of the three slots may stream
        assert len(refused) == 1, [stream.done() for stream in streams]
        assert streams[refused[0]].code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "2 streams are open" in streams[refused[0]].details()
        holding = [i for i in range(3) if i not in refused]
        with pytest.raises(grpc.RpcError) as second_stream:  # one HTTP/2 stream per connection: it waits
            stats(channels[holding[0]], timeout=1)
        assert second_stream.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert stats(channels[3]).images == 0  # the streams hold two slots: the third serves the rest
        health = health_pb2_grpc.HealthStub(channels[3]).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        release.set()
        for i in holding:
            assert list(streams[i]) == []
        assert stats(channels[holding[0]]).images == 0
    finally:
        release.set()
        for channel in channels:
            channel.close()


def test_an_idle_upload_ends_with_deadline_exceeded_and_gives_its_video_slot_back(server) -> None:
    header = pb.IndexVideoRequest(header=pb.VideoHeader(video_id="idle", size_bytes=1000))
    stop = threading.Event()

    def stalled() -> Iterator[pb.IndexVideoRequest]:
        yield header
        stop.wait(60)

    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.InstanceSearchStub(channel)
        try:
            for _ in range(3):  # two videos index at once: a slot kept by an idle upload would refuse the third
                started = time.monotonic()
                with pytest.raises(grpc.RpcError) as idle:
                    list(stub.IndexVideo(stalled(), timeout=60))
                assert idle.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, idle.value.details()
                assert "no message for 8 s" in idle.value.details() and time.monotonic() - started < 30
        finally:
            stop.set()


def test_requests_past_the_server_deadline_get_deadline_exceeded(server) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.InstanceSearchStub(channel)
        with pytest.raises(grpc.RpcError) as late:
            list(stub.Search(pb.SearchRequest(image=encode(photo("chelsea"))), timeout=60))
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "deadline passed" in late.value.details()
        request = pb.IndexImageRequest(id="late", image=encode(photo("coffee")))
        with pytest.raises(grpc.RpcError) as late_image:
            list(stub.IndexImages(iter([request]), timeout=60))
        assert late_image.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert stats(channel).images == 0
