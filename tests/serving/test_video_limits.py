"""A server indexing its maximum of videos refuses more with RESOURCE_EXHAUSTED before their upload, through
both clients, and takes videos again once the slot is free."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from servers import running_server

from inserve.clients.client import AsyncInstanceSearchClient, InstanceSearchClient, VideoItem
from inserve.v1 import inserve_pb2 as pb

BUSY = "1 videos are indexing; retry later"
NO_VIDEO = "no video: neither a path nor any chunk was sent"


def status(error: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    return error.code(), error.details()


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


def test_a_busy_server_refuses_videos_before_their_upload(models_dir: Path, tmp_path: Path) -> None:
    """The refused uploads are 4 MiB in 16 KiB chunks: refused while the client was still writing, grpc.aio
    reported INTERNAL "Internal error from Core" instead of the server's RESOURCE_EXHAUSTED."""
    upload = tmp_path / "upload.mp4"
    upload.write_bytes(np.random.default_rng(0).integers(0, 256, 4 << 20, dtype=np.uint8).tobytes())
    video = VideoItem("refused", file=upload)
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

        release.set()
        with pytest.raises(grpc.RpcError) as caught:
            list(holder)
        assert status(caught.value) == (grpc.StatusCode.INVALID_ARGUMENT, f"video 'held': {NO_VIDEO}")
        code, details = sync_attempt(client, video)  # the slot is free again: the upload is read, and is no video
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("video 'refused': "), details
