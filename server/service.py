"""gRPC servicer: translates inserve.v1 messages to InstanceSearch calls and errors to status codes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import grpc

from inserve.server.imaging import ImageError
from inserve.server.index import DuplicateId
from inserve.server.instance_search import InstanceSearch, RequestError, UnavailableError
from inserve.server.search import Hit, SearchOptions
from inserve.v1 import inserve_pb2 as pb
from inserve.v1 import inserve_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

MAX_ID_LENGTH = 512
T = TypeVar("T")


def _box(message: pb.Box) -> tuple[float, float, float, float]:
    return (message.x1, message.y1, message.x2, message.y2)


def box_message(box: tuple[float, ...]) -> pb.Box:
    return pb.Box(x1=box[0], y1=box[1], x2=box[2], y2=box[3])


def check_id(external_id: str) -> None:
    if not external_id:
        raise RequestError("id is empty")
    if len(external_id) > MAX_ID_LENGTH:
        raise RequestError(f"id is {len(external_id)} characters long, at most {MAX_ID_LENGTH}")


class InstanceSearchServicer(pb_grpc.InstanceSearchServicer):
    def __init__(self, core: InstanceSearch, executor: ThreadPoolExecutor) -> None:
        self.core = core
        self.executor = executor

    async def _run(self, fn: Callable[..., T], *args: object, **kwargs: object) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, lambda: fn(*args, **kwargs))

    async def _abort_on_bad_input(self, context: grpc.aio.ServicerContext, exc: Exception, what: str) -> None:
        if isinstance(exc, DuplicateId):
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"{what}: already indexed (set replace to re-index)")
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{what}: {exc}")

    async def IndexImages(
        self, request_iterator: AsyncIterator[pb.IndexImageRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.IndexImageAck]:
        seen: set[str] = set()
        async for request in request_iterator:
            what = f"image {request.id!r}"
            try:
                check_id(request.id)
                if request.id in seen and not request.replace:
                    raise DuplicateId(request.id)
                if not request.replace and self.core.index.contains(request.id):
                    raise DuplicateId(request.id)
                indexed = await self._run(
                    self.core.index_image,
                    request.id,
                    request.image,
                    source=request.source,
                    metadata=dict(request.metadata),
                    replace=request.replace,
                )
            except (ImageError, RequestError, DuplicateId) as exc:
                await self._abort_on_bad_input(context, exc, what)
            seen.add(request.id)
            regions = [
                pb.Region(box=box_message(box), score=float(score))
                for described in indexed.described.values()
                for box, score in zip(described.regions.boxes, described.regions.scores)
            ]
            yield pb.IndexImageAck(
                id=indexed.external_id,
                width=indexed.width,
                height=indexed.height,
                regions=regions,
                recipes=list(indexed.described),
            )

    async def Search(self, request: pb.SearchRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.SearchHit]:
        try:
            box = _box(request.box) if request.HasField("box") else None
            hits = await self._run(
                self.core.search, request.image, box, request.top_k, request.recipe, search_options(request.options)
            )
        except UnavailableError as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"search: {exc}")
        except (ImageError, RequestError) as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"search: {exc}")
        thumbnails = self.core.index.store.thumbnails([h.image.id for h in hits]) if request.thumbnails else {}
        for rank, hit in enumerate(hits, start=1):
            yield hit_message(rank, hit, thumbnails.get(hit.image.id, b""))

    async def Delete(self, request: pb.DeleteRequest, context: grpc.aio.ServicerContext) -> pb.DeleteResponse:
        if not request.ids:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "delete: no ids given")
        deleted, missing = await self._run(self.core.delete, list(request.ids))
        return pb.DeleteResponse(deleted=deleted, missing=missing)

    async def GetStats(self, request: pb.GetStatsRequest, context: grpc.aio.ServicerContext) -> pb.Stats:
        stats = await self._run(self.core.stats)
        return pb.Stats(
            images=stats.images,
            regions=stats.regions,
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


def search_options(message: pb.SearchOptions) -> SearchOptions:
    """Absent fields stay None: the recipe's defaults apply."""
    return SearchOptions(
        query_expansion=message.query_expansion if message.HasField("query_expansion") else None,
        rerank_top=message.rerank_top if message.HasField("rerank_top") else None,
    )


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
    return message
