"""Python clients for the inserve gRPC API, blocking and asyncio, over the generated stubs."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from inserve.clients.channels import ChannelSecurity, WithMetadata, open_aio_channel, open_channel
from inserve.server.grouping import grouping_value
from inserve.v1 import inserve_pb2 as pb
from inserve.v1 import inserve_pb2_grpc as pb_grpc

DEFAULT_MAX_MESSAGE_BYTES = 64 << 20
DEFAULT_TIMEOUT_S = 60.0  # deadline of a call that answers at once (Search, Delete, GetStats)
VIDEO_CHUNK_BYTES = 1 << 20

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class ImageItem:
    """One image to index."""

    id: str
    image: bytes
    source: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    replace: bool = False

    @staticmethod
    def from_path(path: Path, id: str | None = None, replace: bool = False) -> ImageItem:
        path = Path(path)
        return ImageItem(id or path.name, path.read_bytes(), str(path), replace=replace)

    def message(self) -> pb.IndexImageRequest:
        return pb.IndexImageRequest(
            id=self.id, image=self.image, source=self.source, metadata=self.metadata, replace=self.replace
        )


@dataclass(frozen=True)
class VideoItem:
    """One video to index: a local file streamed in chunks, or a path on the server under its media root."""

    id: str
    file: Path | None = None
    server_path: str = ""
    source: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    scene_threshold: float | None = None  # None = the server's default, as the three below
    min_interval_s: float | None = None
    max_interval_s: float | None = None
    iframes_only: bool | None = None

    @property
    def uploaded(self) -> bool:
        """The file goes to the server in chunks (rather than being read there under its media root)."""
        return self.file is not None and not self.server_path

    def header(self) -> pb.VideoHeader:
        options = pb.KeyframeOptions()
        for name in ("scene_threshold", "min_interval_s", "max_interval_s", "iframes_only"):
            if getattr(self, name) is not None:
                setattr(options, name, getattr(self, name))
        source = self.source or (str(self.file) if self.file is not None else "")
        return pb.VideoHeader(
            video_id=self.id,
            path=self.server_path,
            source=source,
            metadata=self.metadata,
            options=options,
            size_bytes=Path(self.file).stat().st_size if self.uploaded else 0,
        )

    def messages(self, chunk_bytes: int = VIDEO_CHUNK_BYTES) -> Iterator[pb.IndexVideoRequest]:
        """The header, then the file's chunks (none when the server reads the file itself)."""
        yield pb.IndexVideoRequest(header=self.header())
        if self.uploaded:
            with Path(self.file).open("rb") as f:
                while chunk := f.read(chunk_bytes):
                    yield pb.IndexVideoRequest(chunk=chunk)


@dataclass(frozen=True)
class LiveStreamSpec:
    """A live stream's header: its id (reopening the same id continues the stream) and how keyframes are
    chosen; None = the server's default."""

    id: str
    source: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    client_keyframes: bool = False  # index exactly the frames marked keyframe
    overload: str = "wait"  # when the server is behind: "wait" (slow the sender) or "drop" (unmarked frames)
    scene_threshold: float | None = None
    min_interval_s: float | None = None
    max_interval_s: float | None = None

    def header(self) -> pb.LiveStreamHeader:
        options = pb.KeyframeOptions()
        for name in ("scene_threshold", "min_interval_s", "max_interval_s"):
            if getattr(self, name) is not None:
                setattr(options, name, getattr(self, name))
        return pb.LiveStreamHeader(
            stream_id=self.id,
            source=self.source,
            metadata=self.metadata,
            options=options,
            client_keyframes=self.client_keyframes,
            overload=pb.Overload.Value("OVERLOAD_" + self.overload.upper()),
        )


def search_request(
    image: bytes,
    box: Box | None = None,
    top_k: int = 0,
    recipe: str = "",
    query_expansion: int | None = None,
    thumbnails: bool = False,
    rerank_top: int | None = None,
    group: str = "none",
) -> pb.SearchRequest:
    """query_expansion / rerank_top: None = the recipe's default, 0 = off."""
    request = pb.SearchRequest(
        image=image,
        top_k=top_k,
        recipe=recipe,
        thumbnails=thumbnails,
        options=pb.SearchOptions(query_expansion=query_expansion, rerank_top=rerank_top, group=grouping_value(group)),
    )
    if box is not None:
        request.box.CopyFrom(pb.Box(x1=box[0], y1=box[1], x2=box[2], y2=box[3]))
    return request


def _stream_request(query: pb.SearchRequest | pb.SearchStreamRequest) -> pb.SearchStreamRequest:
    return query if isinstance(query, pb.SearchStreamRequest) else pb.SearchStreamRequest(query=query)


class InstanceSearchClient:
    """Blocking client.

    timeout: the deadline in seconds of each call that answers at once (Search, Delete, GetStats; None = none).
    stream_timeout: the deadline of calls that stream requests (IndexImages, SearchStream, IndexVideo), which
    may run for hours (default none). Live streams have none: they do not end.
    retries: Search, SearchStream (until its first answer) and GetStats are tried again by gRPC on UNAVAILABLE
    and RESOURCE_EXHAUSTED, up to 5 attempts with exponential backoff (clients/channels.py RETRY_POLICY).
    Connections with calls in flight are kept alive by pings (a dead server shows within 40 s).
    security: how to reach a server with TLS or tokens.
    """

    def __init__(
        self,
        address: str,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        security: ChannelSecurity = ChannelSecurity(),
        stream_timeout: float | None = None,
        retries: bool = True,
    ) -> None:
        self.channel = open_channel(address, security, max_message_bytes, retries)
        self.stub = WithMetadata(pb_grpc.InstanceSearchStub(self.channel), security.metadata())
        self.timeout, self.stream_timeout = timeout, stream_timeout

    def index_images(self, items: Iterable[ImageItem]) -> Iterator[pb.IndexImageAck]:
        """Acknowledgements in order; raises grpc.RpcError at the first image the server refuses."""
        return self.stub.IndexImages((item.message() for item in items), timeout=self.stream_timeout)

    def search(
        self,
        image: bytes,
        box: Box | None = None,
        top_k: int = 0,
        recipe: str = "",
        query_expansion: int | None = None,
        thumbnails: bool = False,
        rerank_top: int | None = None,
        group: str = "none",
    ) -> list[pb.SearchHit]:
        """query_expansion (M) and rerank_top (N): None = the recipe's default, 0 = off."""
        request = search_request(image, box, top_k, recipe, query_expansion, thumbnails, rerank_top, group)
        return list(self.stub.Search(request, timeout=self.timeout))

    def search_stream(
        self, queries: Iterable[pb.SearchRequest | pb.SearchStreamRequest]
    ) -> Iterator[pb.SearchStreamResponse]:
        """One response per query, in order (build queries with search_request); queries are sent as
        they are produced, so a live source can feed the stream."""
        return self.stub.SearchStream((_stream_request(q) for q in queries), timeout=self.stream_timeout)

    def index_video(self, video: VideoItem, chunk_bytes: int = VIDEO_CHUNK_BYTES) -> Iterator[pb.IndexVideoProgress]:
        """Progress messages; the last has done = true. Raises grpc.RpcError when the server refuses. The file
        is sent only once the server has answered the header, so a refusal costs no upload."""
        taken = threading.Event()

        def requests() -> Iterator[pb.IndexVideoRequest]:
            messages = video.messages(chunk_bytes)
            yield next(messages)
            taken.wait()
            yield from messages

        responses = self.stub.IndexVideo(requests(), timeout=self.stream_timeout)
        try:
            for progress in responses:
                taken.set()
                yield progress
        finally:
            taken.set()  # answered, refused or abandoned: the request thread goes on (and stops at a done call)
            responses.cancel()

    def index_live_stream(
        self, stream: LiveStreamSpec, frames: Callable[[pb.LiveStreamOpened], Iterable[pb.LiveFrame]]
    ) -> Iterator[pb.LiveStreamEvent]:
        """One connection of a live stream: events as they come, `opened` first. `frames(opened)` is called once
        the server has answered the header, so that a reconnection can start after `opened.resume_after_s`.
        Streams have no deadline (a live source does not end); see clients/ingest.py for reconnection."""
        opened: list[pb.LiveStreamOpened] = []
        answered = threading.Event()
        ended = threading.Event()

        def requests() -> Iterator[pb.LiveStreamRequest]:
            yield pb.LiveStreamRequest(header=stream.header())
            answered.wait()
            if not opened:
                return
            for frame in frames(opened[0]):
                if ended.is_set():
                    return
                yield pb.LiveStreamRequest(frame=frame)

        responses = self.stub.IndexLiveStream(requests())
        try:
            for event in responses:
                if event.HasField("opened"):
                    opened.append(event.opened)
                    answered.set()
                yield event
        finally:
            ended.set()
            answered.set()
            responses.cancel()

    def delete(self, ids: list[str]) -> pb.DeleteResponse:
        return self.stub.Delete(pb.DeleteRequest(ids=ids), timeout=self.timeout)

    def stats(self) -> pb.Stats:
        return self.stub.GetStats(pb.GetStatsRequest(), timeout=self.timeout)

    def wait_ready(self, timeout: float = 30.0) -> None:
        grpc.channel_ready_future(self.channel).result(timeout=timeout)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> InstanceSearchClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncInstanceSearchClient:
    """asyncio client with the same calls and options as InstanceSearchClient."""

    def __init__(
        self,
        address: str,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        security: ChannelSecurity = ChannelSecurity(),
        stream_timeout: float | None = None,
        retries: bool = True,
    ) -> None:
        self.channel = open_aio_channel(address, security, max_message_bytes, retries)
        self.stub = WithMetadata(pb_grpc.InstanceSearchStub(self.channel), security.metadata())
        self.timeout, self.stream_timeout = timeout, stream_timeout

    async def index_images(
        self, items: Iterable[ImageItem] | AsyncIterable[ImageItem]
    ) -> AsyncIterator[pb.IndexImageAck]:
        async def messages() -> AsyncIterator[pb.IndexImageRequest]:
            if isinstance(items, AsyncIterable):
                async for item in items:
                    yield item.message()
            else:
                for item in items:
                    yield item.message()

        async for ack in self.stub.IndexImages(messages(), timeout=self.stream_timeout):
            yield ack

    async def search(
        self,
        image: bytes,
        box: Box | None = None,
        top_k: int = 0,
        recipe: str = "",
        query_expansion: int | None = None,
        thumbnails: bool = False,
        rerank_top: int | None = None,
        group: str = "none",
    ) -> list[pb.SearchHit]:
        request = search_request(image, box, top_k, recipe, query_expansion, thumbnails, rerank_top, group)
        return [hit async for hit in self.stub.Search(request, timeout=self.timeout)]

    async def search_stream(
        self, queries: AsyncIterable[pb.SearchRequest | pb.SearchStreamRequest]
    ) -> AsyncIterator[pb.SearchStreamResponse]:
        async def messages() -> AsyncIterator[pb.SearchStreamRequest]:
            async for query in queries:
                yield _stream_request(query)

        async for response in self.stub.SearchStream(messages(), timeout=self.stream_timeout):
            yield response

    async def index_video(
        self, video: VideoItem, chunk_bytes: int = VIDEO_CHUNK_BYTES
    ) -> AsyncIterator[pb.IndexVideoProgress]:
        """The header first, the chunks only once the server has taken the video on (its first progress
        message). A server that ends the call while grpc.aio is still writing shows as INTERNAL "Internal
        error from Core" instead of its status, so a refusal must come before the upload starts: the header
        says the file's size, so that an upload over the server's limit is refused then too."""
        messages = video.messages(chunk_bytes)
        call = self.stub.IndexVideo(timeout=self.stream_timeout)
        await call.write(next(messages))
        accepted = await call.read()
        if accepted is grpc.aio.EOF:
            return
        yield accepted

        async def upload() -> None:
            for message in messages:
                await call.write(message)
            await call.done_writing()

        sender = asyncio.ensure_future(upload())
        try:
            while (progress := await call.read()) is not grpc.aio.EOF:
                yield progress
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, asyncio.InvalidStateError, grpc.RpcError):
                await sender

    async def delete(self, ids: list[str]) -> pb.DeleteResponse:
        return await self.stub.Delete(pb.DeleteRequest(ids=ids), timeout=self.timeout)

    async def stats(self) -> pb.Stats:
        return await self.stub.GetStats(pb.GetStatsRequest(), timeout=self.timeout)

    async def wait_ready(self, timeout: float = 30.0) -> None:
        await asyncio.wait_for(self.channel.channel_ready(), timeout)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncInstanceSearchClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
