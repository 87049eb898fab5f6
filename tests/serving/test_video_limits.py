"""A server indexing its maximum of videos, or given an upload over its limit, refuses with RESOURCE_EXHAUSTED
before the upload, through both clients, and takes videos again once the slot is free. Clients send a file
only once the server has answered its header, which says the file's size."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
from servers import running_server

from inserve.clients.client import VIDEO_CHUNK_BYTES, AsyncInstanceSearchClient, InstanceSearchClient, VideoItem
from inserve.v1 import inserve_pb2 as pb

BUSY = "1 videos are indexing; retry later"
NO_VIDEO = "no video: neither a path nor any chunk was sent"


def status(error: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    return error.code(), error.details()


@dataclass(frozen=True)
class CountedUpload(VideoItem):
    """A video upload that counts the chunks taken from its file."""

    taken: list[int] = field(default_factory=list)

    def messages(self, chunk_bytes: int = VIDEO_CHUNK_BYTES) -> Iterator[pb.IndexVideoRequest]:
        for message in super().messages(chunk_bytes):
            if message.WhichOneof("part") == "chunk":
                self.taken.append(len(message.chunk))
            yield message


def sync_attempt(client: InstanceSearchClient, video: VideoItem) -> tuple[grpc.StatusCode, str]:
    try:
        list(client.index_video(video, chunk_bytes=16 << 10))
    except grpc.RpcError as exc:
        return status(exc)
    return grpc.StatusCode.OK, ""


async def async_attempts(address: str, video: VideoItem, count: int) -> list[tuple[grpc.StatusCode, str]]:
    async with AsyncInstanceSearchClient(address, timeout=60) as client:

        async def one() -> tuple[grpc.StatusCode, str]:
            try:
                async for _ in client.index_video(video, chunk_bytes=16 << 10):
                    pass
            except grpc.aio.AioRpcError as exc:
                return status(exc)
            return grpc.StatusCode.OK, ""

        return await asyncio.gather(*(one() for _ in range(count)))


def random_upload(path: Path) -> Path:
    """4 MiB of random bytes, sent in 256 chunks of 16 KiB."""
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4 << 20, dtype=np.uint8).tobytes())
    return path


def first_not_busy(attempt: Callable[[], tuple[grpc.StatusCode, str]]) -> tuple[grpc.StatusCode, str]:
    """The first outcome of `attempt` that is not RESOURCE_EXHAUSTED, trying for up to 10 s (a slot is freed
    once the server has seen its call end)."""
    for _ in range(100):
        outcome = attempt()
        if outcome[0] != grpc.StatusCode.RESOURCE_EXHAUSTED:
            return outcome
        time.sleep(0.1)
    return outcome


def test_a_busy_server_refuses_videos_before_their_upload(models_dir: Path, tmp_path: Path) -> None:
    """The refused uploads are 4 MiB in 16 KiB chunks: refused while the client was still writing, grpc.aio
    reported INTERNAL "Internal error from Core" instead of the server's RESOURCE_EXHAUSTED."""
    upload = random_upload(tmp_path / "upload.mp4")
    video = CountedUpload("refused", file=upload)
    release = threading.Event()

    def held() -> Iterator[pb.IndexVideoRequest]:
        """A header, then nothing until released: holds the server's one video slot."""
        yield pb.IndexVideoRequest(header=pb.VideoHeader(video_id="held"))
        release.wait(120)

    flags = ("--recipe", "gem", "--max-videos", "1")
    with (
        running_server(models_dir, tmp_path / "data", *flags) as running,
        InstanceSearchClient(running.address, timeout=120) as client,
    ):
        client.wait_ready()
        holder = client.stub.IndexVideo(held(), timeout=120)
        taken = next(holder)  # the server's answer to the header: the video is taken on, the slot held
        assert (taken.video_id, taken.frames_decoded, taken.keyframes_indexed, taken.done) == ("held", 0, 0, False)

        outcomes = [sync_attempt(client, video) for _ in range(3)]
        outcomes += asyncio.run(async_attempts(running.address, video, 6))
        assert outcomes == [(grpc.StatusCode.RESOURCE_EXHAUSTED, f"video 'refused': {BUSY}")] * 9
        # 256 chunks each: at most the one a sender takes before it sees the call ended was read
        assert len(video.taken) <= 9, f"{len(video.taken)} chunks read for 9 refused uploads"

        release.set()
        with pytest.raises(grpc.RpcError) as caught:
            list(holder)
        assert status(caught.value) == (grpc.StatusCode.INVALID_ARGUMENT, f"video 'held': {NO_VIDEO}")
        abandoned = client.index_video(VideoItem("abandoned", file=upload), chunk_bytes=16 << 10)
        assert next(abandoned).video_id == "abandoned"  # taken on: the slot is this upload's now
        abandoned.close()  # its caller goes away: the call is cancelled and the server frees the slot
        code, details = first_not_busy(lambda: sync_attempt(client, video))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("video 'refused': "), details


def test_an_upload_over_the_limit_is_refused_before_it_is_sent(models_dir: Path, tmp_path: Path) -> None:
    """Before headers said the file's size, the server refused only once the chunks had passed its limit. In one
    run, one asyncio upload got INTERNAL "Internal error from Core" (grpc.aio was still writing), and four were
    told to retry later: the two video slots were held by uploads that were being refused."""
    video = CountedUpload("large", file=random_upload(tmp_path / "upload.mp4"))
    with (
        running_server(models_dir, tmp_path / "data", "--recipe", "gem", "--max-video-mb", "1") as running,
        InstanceSearchClient(running.address, timeout=120) as client,
    ):
        client.wait_ready()
        outcomes = [sync_attempt(client, video) for _ in range(3)]
        outcomes += asyncio.run(async_attempts(running.address, video, 6))
    too_large = f"video 'large': upload of {4 << 20} bytes exceeds the {1 << 20}-byte limit for videos"
    assert outcomes == [(grpc.StatusCode.RESOURCE_EXHAUSTED, too_large)] * 9
    assert len(video.taken) <= 9, f"{len(video.taken)} chunks read for 9 refused uploads"
