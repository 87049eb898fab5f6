"""SearchStream answers many queries in order; a full queue refuses work with RESOURCE_EXHAUSTED and the
server recovers; cancelled calls do not hurt it."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from media import jpeg, resized
from servers import running_server
from skimage import data

from inserve.clients.client import AsyncInstanceSearchClient, ImageItem, InstanceSearchClient, search_request
from inserve.v1 import inserve_pb2 as pb

PHOTOS = {
    "astronaut": data.astronaut(),
    "coffee": data.coffee(),
    "chelsea": data.chelsea(),
    "rocket": data.rocket(),
    "camera": np.stack([data.camera()] * 3, axis=-1),
}


def twenty_photos() -> dict[str, bytes]:
    """Five photos, each whole, mirrored, and two crops: twenty distinct images."""
    out = {}
    for name, photo in PHOTOS.items():
        h, w = photo.shape[:2]
        out[f"{name}"] = jpeg(photo)
        out[f"{name}-mirror"] = jpeg(np.ascontiguousarray(photo[:, ::-1]))
        out[f"{name}-left"] = jpeg(np.ascontiguousarray(photo[:, : w * 2 // 3]))
        out[f"{name}-top"] = jpeg(resized(np.ascontiguousarray(photo[: h * 2 // 3]), (w, h * 2 // 3)))
    return out


@pytest.fixture(scope="module")
def server(models_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    data_dir = tmp_path_factory.mktemp("stream-data")
    with running_server(models_dir, data_dir, "--recipe", "gem") as running:
        with InstanceSearchClient(running.address, timeout=120) as client:
            client.wait_ready()
            acks = list(client.index_images(ImageItem(name, image) for name, image in twenty_photos().items()))
            assert [a.id for a in acks] == list(twenty_photos())
        yield running


def test_twenty_queries_on_one_stream_are_answered_in_order(server) -> None:
    photos = twenty_photos()
    queries = [
        pb.SearchStreamRequest(query=search_request(image, top_k=3), tag=f"q{i}")
        for i, image in enumerate(photos.values())
    ]
    with InstanceSearchClient(server.address, timeout=120) as client:
        responses = list(client.search_stream(iter(queries)))
    assert [r.index for r in responses] == list(range(20))
    assert [r.tag for r in responses] == [q.tag for q in queries]
    assert all(r.error_code == 0 and len(r.hits) == 3 for r in responses)
    assert [r.hits[0].id for r in responses] == list(photos)  # each query finds itself first


def test_a_client_waiting_for_each_answer_is_served(server) -> None:
    """The server reads ahead without waiting for requests it does not need yet: no deadlock."""
    photos = list(twenty_photos().items())[:5]
    outgoing: queue.Queue = queue.Queue()
    answers = []
    with InstanceSearchClient(server.address, timeout=60) as client:
        responses = client.search_stream(iter(outgoing.get, None))
        for _, image in photos:
            outgoing.put(search_request(image, top_k=1))
            answers.append(next(responses).hits[0].id)
        outgoing.put(None)
        assert list(responses) == []
    assert answers == [name for name, _ in photos]


def test_a_bad_query_gets_its_error_and_the_stream_goes_on(server) -> None:
    good = jpeg(PHOTOS["coffee"])
    queries = [
        search_request(good, top_k=1),
        search_request(b"not an image", top_k=1),
        search_request(good, top_k=1, recipe="no-such-recipe"),
        search_request(good, top_k=1),
    ]
    with InstanceSearchClient(server.address, timeout=60) as client:
        responses = list(client.search_stream(iter(queries)))
    invalid = grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert [r.error_code for r in responses] == [0, invalid, invalid, 0]
    assert "cannot decode image" in responses[1].error and "unknown recipe" in responses[2].error
    assert responses[0].hits[0].id == responses[3].hits[0].id == "coffee"


async def flood(address: str, image: bytes, calls: int, timeout: float = 120) -> list[tuple[grpc.StatusCode, str]]:
    """`calls` concurrent searches: (status, details) of each, as the server answered them (no retries)."""
    async with AsyncInstanceSearchClient(address, timeout=timeout, retries=False) as client:

        async def one() -> tuple[grpc.StatusCode, str]:
            try:
                await client.search(image, top_k=1)
            except grpc.aio.AioRpcError as exc:
                return exc.code(), exc.details()
            return grpc.StatusCode.OK, ""

        return await asyncio.gather(*(one() for _ in range(calls)))


def test_a_full_queue_gives_resource_exhausted_and_the_server_recovers(models_dir: Path, tmp_path: Path) -> None:
    flags = ["--recipe", "gem", "--queue-depth", "1", "--max-batch", "1", "--max-delay-ms", "0", "--workers", "4"]
    with running_server(models_dir, tmp_path / "data", *flags) as running:
        image = jpeg(PHOTOS["astronaut"])
        with InstanceSearchClient(running.address, timeout=60) as client:
            client.wait_ready()
            list(client.index_images([ImageItem("astronaut", image)]))
            for _ in range(2):  # overloaded, serving one at a time, overloaded again
                outcome = asyncio.run(flood(running.address, image, 32))
                codes = [code for code, _ in outcome]
                assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
                assert all("retry later" in details for code, details in outcome if code != grpc.StatusCode.OK)
                for _ in range(3):
                    assert client.search(image, top_k=1)[0].id == "astronaut"


def test_cancelled_streams_leave_the_server_serving(server) -> None:
    image = jpeg(PHOTOS["rocket"])
    with InstanceSearchClient(server.address, timeout=60) as client:
        stop = threading.Event()

        def endless():
            while not stop.is_set():
                yield search_request(image, top_k=1)

        responses = client.search_stream(endless())
        assert next(responses).hits[0].id == "rocket"
        responses.cancel()
        stop.set()
        with pytest.raises(grpc.RpcError) as caught:
            list(responses)
        assert caught.value.code() == grpc.StatusCode.CANCELLED
        assert client.search(image, top_k=1)[0].id == "rocket"


def batches_run(server) -> int:
    """Batches the server's batcher has run so far (its debug log), once it has gone quiet."""
    count, quiet_since = -1, time.monotonic()
    while time.monotonic() - quiet_since < 1.0:
        now = sum("batcher: batch of" in line for line in list(server.output))
        if now != count:
            count, quiet_since = now, time.monotonic()
        time.sleep(0.1)
    return count


async def cancel_after_first(address: str, image: bytes, calls: int) -> None:
    """`calls` concurrent searches; the moment one is answered, the others are cancelled."""
    async with AsyncInstanceSearchClient(address, timeout=120) as client:
        tasks = [asyncio.ensure_future(client.search(image, top_k=1)) for _ in range(calls)]
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        assert [t.result()[0].id for t in done] == ["astronaut"] * len(done)


def test_rounds_of_cancelled_calls_leave_the_server_alive(models_dir: Path, tmp_path: Path) -> None:
    """Ending a cancelled call touched its context after gRPC had freed its transport (the peer, for the log):
    a segmentation fault within a few rounds of mass cancellation (grpc/grpc#29069)."""
    flags = ["--recipe", "gem", "--max-batch", "1", "--max-delay-ms", "0", "--queue-depth", "64"]
    with running_server(models_dir, tmp_path / "data", *flags) as running:
        image = jpeg(PHOTOS["astronaut"])
        with InstanceSearchClient(running.address, timeout=60) as client:
            client.wait_ready()
            list(client.index_images([ImageItem("astronaut", image)]))
            for attempt in range(8):
                asyncio.run(cancel_after_first(running.address, image, 48))
                time.sleep(0.2)
                assert running.process.poll() is None, f"died in round {attempt}:\n" + "".join(running.output[-40:])
            assert client.search(image, top_k=1)[0].id == "astronaut"


def test_cancelled_and_expired_calls_leave_the_queue_unrun(models_dir: Path, tmp_path: Path) -> None:
    """One image per batch at 512 px: 48 queued searches take well over a second. Cancelling them after the
    first answer, or giving them a 0.3 s deadline, must free the queue: most never reach the network."""
    calls = 48
    flags = ["--recipe", "gem", "--max-batch", "1", "--max-delay-ms", "0", "--queue-depth", "64", "--long-side", "512"]
    with running_server(models_dir, tmp_path / "data", *flags, global_flags=("--log-level", "DEBUG")) as running:
        image = jpeg(PHOTOS["astronaut"])
        with InstanceSearchClient(running.address, timeout=60) as client:
            client.wait_ready()
            list(client.index_images([ImageItem("astronaut", image)]))
            before = batches_run(running)
            asyncio.run(cancel_after_first(running.address, image, calls))
            cancelled_ran = batches_run(running) - before
            assert running.process.poll() is None, "the server died:\n" + "".join(running.output[-40:])
            assert cancelled_ran < calls // 2, f"{cancelled_ran} of {calls} cancelled searches still ran"

            before = batches_run(running)
            outcome = asyncio.run(flood(running.address, image, calls, timeout=0.3))
            expired_ran = batches_run(running) - before
            codes = [code for code, _ in outcome]
            assert running.process.poll() is None, "the server died:\n" + "".join(running.output[-40:])
            assert grpc.StatusCode.DEADLINE_EXCEEDED in codes, outcome[:3]
            assert expired_ran <= codes.count(grpc.StatusCode.OK) + calls // 4, (expired_ran, codes)
            assert client.search(image, top_k=1)[0].id == "astronaut"


def test_one_stream_longer_than_a_small_queue_is_indexed_whole(models_dir: Path, tmp_path: Path) -> None:
    """A queue of 4, below the stream window of 8: a lone 10-image IndexImages stream keeps at most 4 images in
    flight and is indexed whole, none refused."""
    photos = dict(list(twenty_photos().items())[:10])
    small = running_server(models_dir, tmp_path / "data", "--recipe", "gem", "--queue-depth", "4", "--max-batch", "2")
    with small as running, InstanceSearchClient(running.address) as client:
        client.wait_ready()
        acks = list(client.index_images(ImageItem(name, image) for name, image in photos.items()))
    assert [a.id for a in acks] == list(photos)  # a refusal would have ended the stream with RESOURCE_EXHAUSTED
