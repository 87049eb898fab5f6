"""gRPC servicer: translates inserve.v1 messages to InstanceSearch calls and errors to status codes."""

from __future__ import annotations

import asyncio
import logging
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, aclosing
from typing import BinaryIO, TypeVar

import grpc

from inserve.server.errors import (
    REQUEST_ERRORS,
    DuplicateId,
    IdError,
    Overloaded,
    RequestError,
    VideoError,
)
from inserve.server.grpc.call_slots import outcome_seen
from inserve.server.grpc.messages import (
    Failed,
    ack_message,
    box_tuple,
    enum_name,
    hit_message,
    live_event_message,
    live_frames,
    progress_message,
    search_options,
    selection_rules,
    shown,
    status_of,
)
from inserve.server.grpc.streams import ordered
from inserve.server.ids import check_deletable_id, check_id
from inserve.server.instance_search import InstanceSearch
from inserve.server.video.indexer import VideoProgress, index_video
from inserve.server.video.keyframes import SelectionRules
from inserve.server.video.live import (
    LiveStream,
    index_live,
)
from inserve.server.video.media import open_media
from inserve.v1 import inserve_pb2 as pb
from inserve.v1 import inserve_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

T = TypeVar("T")


def deadline_of(context: grpc.aio.ServicerContext, limit_s: float | None = None) -> float | None:
    """The call's deadline in time.monotonic() seconds, at most `limit_s` from now (None = none)."""
    remaining = context.time_remaining()
    if limit_s is not None:
        remaining = limit_s if remaining is None else min(remaining, limit_s)
    return None if remaining is None else time.monotonic() + remaining


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
        plan = self.core.plan(request.recipe, request.top_k, search_options(request.options))
        box = box_tuple(request.box) if request.HasField("box") else None
        inp = await self._run(self.core.load, request.image)
        query = await asyncio.wrap_future(self.core.submit_query(inp, box, plan, deadline))
        hits = await self._run(self.core.find, plan, query)
        thumbnails = await self._run(self.core.thumbnails, hits) if request.thumbnails else {}
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
                # off the event loop: a shared store's claim takes round trips to it
                await self._run(held.enter_context, self.core.claim_live(header.stream_id))
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
        try:
            deleted, missing = await self._run(self.core.delete, list(request.ids))
        except REQUEST_ERRORS as exc:  # the shared store down: UNAVAILABLE, as for Search
            await context.abort(*status_of(Failed("delete", exc)))
        return pb.DeleteResponse(deleted=deleted, missing=missing)

    async def GetStats(self, request: pb.GetStatsRequest, context: grpc.aio.ServicerContext) -> pb.Stats:
        try:
            stats = await self._run(self.core.stats)
        except REQUEST_ERRORS as exc:
            await context.abort(*status_of(Failed("stats", exc)))
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
