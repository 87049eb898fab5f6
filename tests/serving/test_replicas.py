"""Two real servers on one Milvus (a `milvus-lite server` process, which serves one store to many processes):
what one acknowledges the other finds on the next call; one killed mid-stream loses nothing it acknowledged
while the other keeps serving; one live stream id is written through one replica at a time; the store going
away gives callers UNAVAILABLE, and serving resumes when it is back."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from media import jpeg, the_object
from photos import distinct_photo
from servers import running_server

from inserve.clients.client import ImageItem, InstanceSearchClient, LiveStreamSpec
from inserve.clients.local_server import free_port, milvus_lite_server
from inserve.v1 import inserve_pb2 as pb

FLAGS = ("--recipe", "gem")
KILL_AFTER = 6  # acknowledgements before the writer is killed


def test_a_store_that_cannot_be_reached_stops_the_server_with_one_line(models_dir: Path, tmp_path: Path) -> None:
    command = [sys.executable, "-m", "inserve.clients.cli", "serve", "--models", str(models_dir)]
    command += ["--store", f"milvus://127.0.0.1:{free_port()}", "--recipe", "gem"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr and done.stderr.count("\n") == 1
    assert "cannot reach the Milvus store http://127.0.0.1:" in done.stderr


def name(i: int) -> str:
    return f"img{i:03d}"


def top(client: InstanceSearchClient, i: int) -> tuple[str, float]:
    hit = client.search(distinct_photo(i), top_k=1)[0]
    return hit.id, hit.score


def top_once_back(client: InstanceSearchClient, i: int, within_s: float = 30.0) -> tuple[str, float]:
    """`top` once the replica has its store again: pymilvus reconnects on its own, which in full test runs on a
    loaded machine took longer than the first search after the store came back."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            return top(client, i)
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def one_writer_per_live_stream(first: InstanceSearchClient, second: InstanceSearchClient) -> None:
    """A live stream id held by a connection to one replica is ABORTED on the other, as on one server, and
    taken by it once the first connection ends."""
    frame = pb.LiveFrame(time_s=0.0, image=jpeg(the_object()), keyframe=True)
    spec = LiveStreamSpec("cam-shared", client_keyframes=True)
    release = threading.Event()

    def held():
        release.wait(60)
        yield frame

    holding = first.index_live_stream(spec, lambda opened: held())
    assert next(holding).WhichOneof("event") == "opened"
    with pytest.raises(grpc.RpcError) as busy:
        list(second.index_live_stream(spec, lambda opened: [frame]))
    assert busy.value.code() == grpc.StatusCode.ABORTED and "another connection" in busy.value.details()
    release.set()
    assert [e.WhichOneof("event") for e in holding] == ["keyframe"]
    later = pb.LiveFrame(time_s=1.0, image=frame.image, keyframe=True)
    taken = list(second.index_live_stream(spec, lambda opened: [later]))
    assert [e.WhichOneof("event") for e in taken] == ["opened", "keyframe"]


def test_two_replicas_share_one_milvus(models_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    store = ("--store", f"milvus://127.0.0.1:{port}")
    with (
        milvus_lite_server(tmp_path / "milvus", port),
        running_server(models_dir, tmp_path / "a", *FLAGS, *store) as a,
        running_server(models_dir, tmp_path / "b", *FLAGS, *store) as b,
        InstanceSearchClient(a.address, timeout=120) as writer,
        InstanceSearchClient(b.address, timeout=120) as reader,
        InstanceSearchClient(f"ipv4:{a.address},{b.address}", timeout=120) as balanced,  # both, round robin
    ):
        writer.wait_ready()
        reader.wait_ready()
        for i in range(3):  # acknowledged by one, found through the other on the next call
            assert [ack.id for ack in writer.index_images([ImageItem(name(i), distinct_photo(i))])] == [name(i)]
            assert top(reader, i) == (name(i), pytest.approx(1.0, abs=1e-4))
        assert reader.delete([name(0)]).deleted == 1  # and the other way round
        assert name(0) not in [hit.id for hit in writer.search(distinct_photo(0), top_k=50)]

        assert [top(balanced, 1)[0] for _ in range(4)] == [name(1)] * 4
        one_writer_per_live_stream(writer, reader)
        acked = []
        stream = writer.index_images(ImageItem(name(i), distinct_photo(i)) for i in range(3, 60))
        with pytest.raises(grpc.RpcError) as cut:
            for ack in stream:
                acked.append(ack.id)
                if len(acked) == KILL_AFTER:
                    a.process.kill()
        assert cut.value.code() == grpc.StatusCode.UNAVAILABLE
        found = [hit.id for hit in reader.search(distinct_photo(1), top_k=100)]
        assert len(found) == len(set(found))  # nothing twice
        assert {name(1), name(2), *acked} <= set(found)  # nothing acknowledged lost; the reader keeps serving
        assert top(reader, 3 + KILL_AFTER - 1) == (acked[-1], pytest.approx(1.0, abs=1e-4))
        for i in (1, 2, 3, 4):  # a client of both replicas goes on being served by the one left
            assert top(balanced, i) == (name(i), pytest.approx(1.0, abs=1e-4))

    with (
        milvus_lite_server(tmp_path / "milvus", port) as milvus,  # the store again, from its files
        running_server(models_dir, tmp_path / "b", *FLAGS, *store) as b,
        InstanceSearchClient(b.address, timeout=120) as reader,
    ):
        assert top(reader, 2) == (name(2), pytest.approx(1.0, abs=1e-4))
        milvus.kill()  # and away under a running replica, then back
        milvus.wait()
        with pytest.raises(grpc.RpcError) as down:
            reader.search(distinct_photo(2), top_k=1)
        assert down.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "Milvus store" in down.value.details()
        for call in (reader.stats, lambda: reader.delete([name(2)])):  # every call, not only Search
            with pytest.raises(grpc.RpcError) as down:
                call()
            assert down.value.code() == grpc.StatusCode.UNAVAILABLE and "Milvus store" in down.value.details()
        with milvus_lite_server(tmp_path / "milvus", port):
            assert top_once_back(reader, 2) == (name(2), pytest.approx(1.0, abs=1e-4))
            assert b.process.poll() is None
