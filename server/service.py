"""gRPC servicer: translates inserve.v1 messages to InstanceSearch calls and errors to status codes."""

from __future__ import annotations

import asyncio
import functools
import logging
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, aclosing
from dataclasses import asdict
from typing import BinaryIO, TypeVar

import grpc

from inserve.server.call_slots import outcome_seen
from inserve.server.config import ImageConfig, VideoConfig
from inserve.server.errors import (
    REQUEST_ERRORS,
    DuplicateId,
    IdError,
    ImageError,
    Overloaded,
    RequestError,
    VideoError,
    status_name,
)
from inserve.server.grouping import grouping_name
from inserve.server.ids import check_deletable_id, check_id
from inserve.server.imaging import decode_image
from inserve.server.instance_search import Indexed, InstanceSearch
from inserve.server.search import Hit, SearchOptions
from inserve.server.streams import ordered
from inserve.server.video.indexer import VideoProgress, index_video
from inserve.server.video.keyframes import SelectionRules
from inserve.server.video.live import (
    FrameRejected,
    FramesDropped,
    KeyframeCommitted,
    LiveEvent,
    LiveFrame,
    LiveStream,
    index_live,
    raw_image,
)
from inserve.server.video.media import open_media
from inserve.v1 import inserve_pb2 as pb
from inserve.v1 import inserve_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

MAX_DETAILS = 2000  # characters of a status message
T = TypeVar("T")


class Failed(Exception):
    """A request error with what it concerned (`image 'x'`), for the status message."""

    def __init__(self, what: str, error: Exception) -> None:
        super().__init__(f"{what}: {error}")
        self.what, self.error = what, error


def shown(external_id: str, limit: int = 64) -> str:
    """An id quoted for a message, cut short when long (the status details echo it to the caller)."""
    return repr(external_id) if len(external_id) <= limit else f"{external_id[:limit]!r}... ({len(external_id)} chars)"


def elided(message: str, limit: int = MAX_DETAILS) -> str:
    """At most `limit` characters: the start and the end (where the reason is) of a longer message. Status
    details travel as trailing metadata, which the client refuses beyond a few KiB."""
    if len(message) <= limit:
        return message
    half = (limit - 5) // 2
    return f"{message[:half]} ... {message[-half:]}"


def status_of(exc: Exception) -> tuple[grpc.StatusCode, str]:
    """The status code and message for a request error (wrapped in Failed or not)."""
    error, what = (exc.error, exc.what) if isinstance(exc, Failed) else (exc, "")
    code = grpc.StatusCode[status_name(error)]  # each error class names its status (server/errors.py)
    message = str(error)
    return code, elided(f"{what}: {message}" if what else message)


def deadline_of(context: grpc.aio.ServicerContext, limit_s: float | None = None) -> float | None:
    """The call's deadline in time.monotonic() seconds, at most `limit_s` from now (None = none)."""
    remaining = context.time_remaining()
    if limit_s is not None:
        remaining = limit_s if remaining is None else min(remaining, limit_s)
    return None if remaining is None else time.monotonic() + remaining


def selection_rules(config: VideoConfig, options: pb.KeyframeOptions) -> SelectionRules:
    """The server's keyframe selection defaults with what the request overrides."""
    try:
        return SelectionRules(
            options.scene_threshold if options.HasField("scene_threshold") else config.scene_threshold,
            options.min_interval_s if options.HasField("min_interval_s") else config.min_interval_s,
            options.max_interval_s if options.HasField("max_interval_s") else config.max_interval_s,
            options.iframes_only if options.HasField("iframes_only") else config.iframes_only,
        )
    except ValueError as exc:
        raise RequestError(str(exc)) from exc


def _box(message: pb.Box) -> tuple[float, float, float, float]:
    return (message.x1, message.y1, message.x2, message.y2)


def box_message(box: tuple[float, ...]) -> pb.Box:
    return pb.Box(x1=box[0], y1=box[1], x2=box[2], y2=box[3])


class InstanceSearchServicer(pb_grpc.InstanceSearchServicer):
    """Decoding and index writes run in `executor`; the networks run in the core's shared batcher, which
    the handlers await without holding a thread, so every concurrent call can join a batch."""

    def __init__(self, core: InstanceSearch, executor: ThreadPoolExecutor) -> None:
        self.core = core
        self.executor = executor
        self.window = core.config.batcher.window
        self.request_limit_s = core.config.limits.request_deadline_s  # per image or query, even on a stream
        self._videos = threading.BoundedSemaphore(core.config.video.max_concurrent)
        self._live_streams = threading.BoundedSemaphore(core.config.video.max_live_streams)

    def check_record(self, source: str, metadata: object) -> None:
        try:
            self.core.config.limits.check_record(source, dict(metadata))
        except ValueError as exc:
            raise RequestError(str(exc)) from exc

    async def _run(self, fn: Callable[..., T], *args: object, **kwargs: object) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, lambda: fn(*args, **kwargs))

    async def IndexImages(
        self, request_iterator: AsyncIterator[pb.IndexImageRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.IndexImageAck]:
        async def describe(_: int, request: pb.IndexImageRequest) -> tuple:
            deadline = deadline_of(context, self.request_limit_s)
            try:
                check_id(request.id)
                self.check_record(request.source, request.metadata)
                self.core.check_id_free(request.id, replace=request.replace)
                inp = await self._run(self.core.load, request.image)
                (future,) = self.core.submit_describe([inp], deadline)
                return request, inp, await asyncio.wrap_future(future)
            except REQUEST_ERRORS as exc:
                raise Failed(f"image {shown(request.id)}", exc) from exc

        try:
            async with aclosing(ordered(request_iterator, describe, self.window)) as described:
                async for request, inp, vectors in described:
                    try:
                        indexed = await self._run(
                            self.core.store,
                            request.id,
                            inp,
                            vectors,
                            source=request.source,
                            metadata=dict(request.metadata),
                            replace=request.replace,
                        )
                    except DuplicateId as exc:
                        raise Failed(f"image {shown(request.id)}", exc) from exc
                    yield ack_message(indexed)
        except Failed as exc:
            await context.abort(*status_of(exc))

    async def _search(self, request: pb.SearchRequest, deadline: float | None) -> list[pb.SearchHit]:
        """One query through the batcher: its hits as messages (raises REQUEST_ERRORS)."""
        name = self.core.recipe_name(request.recipe)
        top_k = self.core.top_k(request.top_k)
        options = self.core.search_options(name, search_options(request.options))
        box = _box(request.box) if request.HasField("box") else None
        inp = await self._run(self.core.load, request.image)
        query = await asyncio.wrap_future(self.core.submit_query(inp, box, name, deadline))
        hits = await self._run(self.core.find, name, query, top_k, options)
        ids = [h.image.id for h in hits]
        thumbnails = await self._run(self.core.index.store.thumbnails, ids) if request.thumbnails else {}
        return [hit_message(rank, hit, thumbnails.get(hit.image.id, b"")) for rank, hit in enumerate(hits, start=1)]

    async def Search(self, request: pb.SearchRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.SearchHit]:
        try:
            hits = await self._search(request, deadline_of(context, self.request_limit_s))
        except REQUEST_ERRORS as exc:
            await context.abort(*status_of(Failed("search", exc)))
        for hit in hits:
            yield hit

    async def SearchStream(
        self, request_iterator: AsyncIterator[pb.SearchStreamRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.SearchStreamResponse]:
        async def answer(index: int, request: pb.SearchStreamRequest) -> pb.SearchStreamResponse:
            try:
                hits = await self._search(request.query, deadline_of(context, self.request_limit_s))
            except REQUEST_ERRORS as exc:
                code, message = status_of(exc)
                return pb.SearchStreamResponse(index=index, tag=request.tag, error_code=code.value[0], error=message)
            return pb.SearchStreamResponse(index=index, tag=request.tag, hits=hits)

        async with aclosing(ordered(request_iterator, answer, self.window)) as responses:
            async for response in responses:
                yield response

    async def IndexVideo(
        self, request_iterator: AsyncIterator[pb.IndexVideoRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.IndexVideoProgress]:
        requests = aiter(request_iterator)
        header = await first_header(requests, context, "video")
        what = f"video {shown(header.video_id)}"
        config = self.core.config.video
        try:  # a header that can never be taken on is refused as such, not with "retry later"
            check_id(header.video_id, "video id")
            self.check_record(header.source, header.metadata)
            self.core.check_id_free(header.video_id, video=True)
            rules = selection_rules(config, header.options)
            if not header.path and header.size_bytes > config.max_upload_bytes:
                raise Overloaded(
                    f"upload of {header.size_bytes} bytes exceeds the {config.max_upload_bytes}-byte limit for videos"
                )
        except REQUEST_ERRORS as exc:
            await context.abort(*status_of(Failed(what, exc)))
        if not self._videos.acquire(blocking=False):
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"{what}: {config.max_concurrent} videos are indexing; retry later"
            )
        released = False
        try:
            yield progress_message(VideoProgress(header.video_id))  # taken on: the client may upload now
            if header.path:
                file = await self._run(open_media, config.media_root, header.path)
            else:
                file = await self._receive(requests, config.max_upload_bytes, header.size_bytes)
            released = True  # from here on the indexing thread releases the slot when it ends
            async with aclosing(self._index_video(header, file, rules, deadline_of(context))) as updates:
                async for progress in updates:
                    yield progress_message(progress)
        except REQUEST_ERRORS as exc:
            await context.abort(*status_of(Failed(what, exc)))
        finally:
            if not released:
                self._videos.release()

    @staticmethod
    async def _receive(requests: AsyncIterator[pb.IndexVideoRequest], limit: int, declared: int) -> BinaryIO:
        """The uploaded chunks in a temporary file (deleted when closed); `declared` is the header's size_bytes
        (0 = not said)."""
        file = tempfile.TemporaryFile(prefix="inserve-video-")  # noqa: SIM115 (returned open, closed by the caller)
        size = 0
        try:
            async for request in requests:
                if request.WhichOneof("part") != "chunk":
                    raise RequestError("only chunks may follow the header")
                size += len(request.chunk)
                if declared and size > declared:
                    raise RequestError(f"the chunks exceed the {declared} bytes the header declared")
                if size > limit:
                    raise Overloaded(f"upload exceeds the {limit}-byte limit for videos")
                file.write(request.chunk)
            if declared and size != declared:
                raise RequestError(f"the upload ended after {size} of the {declared} bytes the header declared")
            if size == 0:
                raise VideoError("no video: neither a path nor any chunk was sent")
            file.seek(0)
            return file
        except BaseException:
            file.close()
            raise

    async def _index_video(
        self, header: pb.VideoHeader, file: BinaryIO, rules: SelectionRules, deadline: float | None
    ) -> AsyncIterator[VideoProgress]:
        """Runs index_video in its own thread (it may take minutes) and relays its progress."""
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue[VideoProgress | None] = asyncio.Queue()
        cancelled = threading.Event()

        def report(update: VideoProgress | None) -> None:
            loop.call_soon_threadsafe(updates.put_nowait, update)

        def work() -> VideoProgress:
            try:
                with file:
                    return index_video(
                        self.core,
                        header.video_id,
                        file,
                        rules,
                        source=header.source or header.path,
                        metadata=dict(header.metadata),
                        progress=report,
                        cancelled=cancelled,
                        deadline=deadline,
                    )
            finally:
                self._videos.release()
                report(None)

        job = loop.run_in_executor(None, work)
        try:
            while (update := await updates.get()) is not None:
                yield update
            await job
        finally:
            cancelled.set()
            job.add_done_callback(outcome_seen)

    async def IndexLiveStream(
        self, request_iterator: AsyncIterator[pb.LiveStreamRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.LiveStreamEvent]:
        requests = aiter(request_iterator)
        header = await first_header(requests, context, "live stream")
        what = f"live stream {shown(header.stream_id)}"
        config = self.core.config.video
        with ExitStack() as held:
            try:
                check_id(header.stream_id, "stream id")
                self.check_record(header.source, header.metadata)
                rules = selection_rules(config, header.options)
                if not self._live_streams.acquire(blocking=False):
                    raise Overloaded(f"{config.max_live_streams} live streams are being indexed; retry later")
                held.callback(self._live_streams.release)
                held.enter_context(self.core.claim_live(header.stream_id))
                stream = await self._run(
                    LiveStream,
                    self.core,
                    header.stream_id,
                    rules,
                    client_keyframes=header.client_keyframes,
                    overload=enum_name(pb.Overload, header.overload, "OVERLOAD_"),
                    source=header.source,
                    metadata=dict(header.metadata),
                )
            except REQUEST_ERRORS as exc:
                await context.abort(*status_of(Failed(what, exc)))
            resume = stream.resume
            opened = pb.LiveStreamOpened(stream_id=header.stream_id, keyframes=resume.keyframes if resume else 0)
            if resume is not None:
                opened.resume_after_s = resume.last_time_s
            yield pb.LiveStreamEvent(opened=opened)
            try:
                frames = live_frames(requests, self.core.config.image)
                async with aclosing(index_live(stream, frames, self._run)) as events:
                    async for event in events:
                        yield live_event_message(header.stream_id, event)
            except REQUEST_ERRORS as exc:
                await context.abort(*status_of(Failed(what, exc)))

    async def Delete(self, request: pb.DeleteRequest, context: grpc.aio.ServicerContext) -> pb.DeleteResponse:
        if not request.ids:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "delete: no ids given")
        try:
            for external_id in request.ids:
                check_deletable_id(external_id)
        except IdError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"delete: {exc}")
        deleted, missing = await self._run(self.core.delete, list(request.ids))
        return pb.DeleteResponse(deleted=deleted, missing=missing)

    async def GetStats(self, request: pb.GetStatsRequest, context: grpc.aio.ServicerContext) -> pb.Stats:
        stats = await self._run(self.core.stats)
        return pb.Stats(
            images=stats.images,
            regions=stats.regions,
            videos=stats.videos,
            keyframes=stats.keyframes,
            backbone=stats.backbone,
            default_recipe=self.core.config.default_recipe,
            recipes=list(stats.recipes),
            unavailable=self.core.unavailable,
            indexes=[
                pb.VectorIndexStats(
                    recipe=s.recipe, kind=s.kind, vectors=s.vectors, dim=s.dim, whitening_version=s.whitening_version
                )
                for s in stats.spaces
            ],
        )


async def first_header(requests: AsyncIterator, context: grpc.aio.ServicerContext, what: str):
    """The header a streaming upload starts with (its `part` oneof); INVALID_ARGUMENT when it does not."""
    first = await anext(requests, None)
    if first is None or first.WhichOneof("part") != "header":
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the first message must be the {what} header")
    return first.header


def search_options(message: pb.SearchOptions) -> SearchOptions:
    """Absent numbers stay None: the recipe's defaults apply."""
    try:
        group = grouping_name(message.group)
    except ValueError as exc:
        raise RequestError(str(exc)) from exc
    return SearchOptions(
        query_expansion=message.query_expansion if message.HasField("query_expansion") else None,
        rerank_top=message.rerank_top if message.HasField("rerank_top") else None,
        group=group,
    )


def enum_name(enum: object, value: int, prefix: str) -> str:
    """A proto enum value as the core names it: OVERLOAD_DROP -> "drop" (RequestError for an unknown value)."""
    if value not in enum.values():
        raise RequestError(f"unknown {prefix.rstrip('_').lower()} {value}")
    return enum.Name(value).removeprefix(prefix).lower()


async def live_frames(requests: AsyncIterator[pb.LiveStreamRequest], limits: ImageConfig) -> AsyncIterator[LiveFrame]:
    """The frames of a live stream, each with when it arrived and how to decode it (off the event loop)."""
    async for request in requests:
        arrived = time.monotonic()
        if request.WhichOneof("part") != "frame":
            raise RequestError("only frames may follow the live stream header")
        frame = request.frame
        kind = frame.WhichOneof("pixels")
        if kind == "image":
            decode = functools.partial(decode_image, frame.image, limits)
        elif kind == "raw":
            raw = frame.raw
            try:  # a value the proto does not define is the frame's fault, rejected by raw_image like "unspecified"
                pixel_format = enum_name(pb.PixelFormat, raw.format, "PIXEL_FORMAT_")
            except RequestError:
                pixel_format = str(raw.format)
            decode = functools.partial(raw_image, raw.width, raw.height, pixel_format, raw.data, limits)
        else:
            decode = functools.partial(_no_pixels, frame.time_s)
        yield LiveFrame(frame.time_s, decode, frame.keyframe, arrived)


def _no_pixels(time_s: float) -> None:
    raise ImageError(f"frame at {time_s!r} s has neither an image nor raw pixels")


def live_event_message(stream_id: str, event: LiveEvent) -> pb.LiveStreamEvent:
    if isinstance(event, KeyframeCommitted):
        keyframe = pb.Keyframe(video_id=stream_id, frame=event.frame, time_s=event.time_s, shot=event.shot)
        return pb.LiveStreamEvent(
            keyframe=pb.LiveKeyframeAck(
                id=event.external_id, keyframe=keyframe, regions=event.regions, latency_s=event.latency_s
            )
        )
    if isinstance(event, FramesDropped):
        return pb.LiveStreamEvent(dropped=pb.LiveFramesDropped(frames=event.frames, until_s=event.until_s))
    assert isinstance(event, FrameRejected)
    code, message = status_of(event.error)
    return pb.LiveStreamEvent(
        rejected=pb.LiveFrameRejected(time_s=event.time_s, error_code=code.value[0], error=message)
    )


def ack_message(indexed: Indexed) -> pb.IndexImageAck:
    regions = [
        pb.Region(box=box_message(box), score=float(score))
        for described in indexed.described.values()
        for box, score in zip(described.regions.boxes, described.regions.scores)
    ]
    return pb.IndexImageAck(
        id=indexed.external_id,
        width=indexed.width,
        height=indexed.height,
        regions=regions,
        recipes=list(indexed.described),
    )


def progress_message(progress: VideoProgress) -> pb.IndexVideoProgress:
    return pb.IndexVideoProgress(**asdict(progress))


def hit_message(rank: int, hit: Hit, thumbnail: bytes = b"") -> pb.SearchHit:
    message = pb.SearchHit(
        rank=rank,
        id=hit.image.external_id,
        score=hit.score,
        source=hit.image.source,
        metadata=hit.image.metadata,
        width=hit.image.width,
        height=hit.image.height,
        region_score=hit.region_score,
        thumbnail=thumbnail,
        region_source=hit.region_source,
    )
    if hit.box is not None:
        message.box.CopyFrom(box_message(hit.box))
    image = hit.image
    if image.video_id is not None:
        message.keyframe.CopyFrom(
            pb.Keyframe(video_id=image.video_id, frame=image.frame, time_s=image.time_s, shot=image.shot)
        )
    return message
