"""Python clients for the inserve gRPC API, blocking and asyncio, over the generated stubs."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from inserve.v1 import inserve_pb2 as pb
from inserve.v1 import inserve_pb2_grpc as pb_grpc

DEFAULT_MAX_MESSAGE_BYTES = 64 << 20

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


def search_request(
    image: bytes,
    box: Box | None = None,
    top_k: int = 0,
    recipe: str = "",
    query_expansion: int | None = None,
    thumbnails: bool = False,
    rerank_top: int | None = None,
) -> pb.SearchRequest:
    """query_expansion / rerank_top: None = the recipe's default, 0 = off."""
    request = pb.SearchRequest(
        image=image,
        top_k=top_k,
        recipe=recipe,
        thumbnails=thumbnails,
        options=pb.SearchOptions(query_expansion=query_expansion, rerank_top=rerank_top),
    )
    if box is not None:
        request.box.CopyFrom(pb.Box(x1=box[0], y1=box[1], x2=box[2], y2=box[3]))
    return request


def _channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [("grpc.max_send_message_length", max_message_bytes), ("grpc.max_receive_message_length", max_message_bytes)]


class InstanceSearchClient:
    """Blocking client. `timeout` is the deadline of each call in seconds (None = none)."""

    def __init__(
        self, address: str, timeout: float | None = None, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    ) -> None:
        self.channel = grpc.insecure_channel(address, options=_channel_options(max_message_bytes))
        self.stub = pb_grpc.InstanceSearchStub(self.channel)
        self.timeout = timeout

    def index_images(self, items: Iterable[ImageItem]) -> Iterator[pb.IndexImageAck]:
        """Acknowledgements in order; raises grpc.RpcError at the first image the server refuses."""
        return self.stub.IndexImages((item.message() for item in items), timeout=self.timeout)

    def search(
        self,
        image: bytes,
        box: Box | None = None,
        top_k: int = 0,
        recipe: str = "",
        query_expansion: int | None = None,
        thumbnails: bool = False,
        rerank_top: int | None = None,
    ) -> list[pb.SearchHit]:
        """query_expansion (M) and rerank_top (N): None = the recipe's default, 0 = off."""
        request = search_request(image, box, top_k, recipe, query_expansion, thumbnails, rerank_top)
        return list(self.stub.Search(request, timeout=self.timeout))

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
    """asyncio client with the same calls as InstanceSearchClient."""

    def __init__(
        self, address: str, timeout: float | None = None, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    ) -> None:
        self.channel = grpc.aio.insecure_channel(address, options=_channel_options(max_message_bytes))
        self.stub = pb_grpc.InstanceSearchStub(self.channel)
        self.timeout = timeout

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

        async for ack in self.stub.IndexImages(messages(), timeout=self.timeout):
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
    ) -> list[pb.SearchHit]:
        request = search_request(image, box, top_k, recipe, query_expansion, thumbnails, rerank_top)
        return [hit async for hit in self.stub.Search(request, timeout=self.timeout)]

    async def delete(self, ids: list[str]) -> pb.DeleteResponse:
        return await self.stub.Delete(pb.DeleteRequest(ids=ids), timeout=self.timeout)

    async def stats(self) -> pb.Stats:
        return await self.stub.GetStats(pb.GetStatsRequest(), timeout=self.timeout)

    async def wait_ready(self, timeout: float = 30.0) -> None:
        import asyncio

        await asyncio.wait_for(self.channel.channel_ready(), timeout)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncInstanceSearchClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
