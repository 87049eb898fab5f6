"""The storage seam: what the rest of the server asks of an index, whichever store holds it.

Two implementations answer it: InstanceIndex (server/index/__init__.py: hnswlib graphs and SQLite in one data
directory, the embedded default) and MilvusIndex (server/index/milvus.py: Milvus collections shared by
replicas); both inherit SpaceRules (server/index/space_rules.py). `open_index` picks one from ServerConfig.store;
nothing above it knows which, and the tests that take conftest's `open_store` hold both to the same behaviour.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Protocol

import numpy as np

from inserve.server.config import IndexConfig
from inserve.server.index.spaces import Aggregate, SpaceSpec, SpaceStats
from inserve.server.index.store import ImageRow, LiveResume, NewKeyframe, NewVectors, VectorRow


class Space(Protocol):
    """A (recipe, kind) vector space as searches and the whitening policy see it."""

    raw_dim: int
    dim: int  # after its transform
    version: int  # of its transform; 0 = none learned
    searchable: bool  # has a kNN index (else its vectors are only read per image)

    def __len__(self) -> int: ...

    def transform(self, raw: np.ndarray) -> np.ndarray:
        """Raw vectors (N, raw_dim) -> the space's coordinates (N, dim)."""
        ...


class Index(Protocol):
    """Images, keyframes and their vectors; kNN per space; learned transforms and models. Writes are atomic
    per image (per video for replace_video) and durable once they return."""

    config: IndexConfig

    def reading(self) -> AbstractContextManager[None]: ...
    def spec(self, recipe: str, kind: str) -> SpaceSpec: ...
    def space(self, recipe: str, kind: str) -> Space | None: ...

    # writes
    def add_image(
        self,
        external_id: str,
        vectors: list[NewVectors],
        *,
        width: int,
        height: int,
        source: str = "",
        metadata: dict[str, str] | None = None,
        replace: bool = False,
        thumbnail: bytes = b"",
    ) -> int: ...
    def replace_video(
        self, video_id: str, keyframes: list[NewKeyframe], *, source: str = "", metadata: dict[str, str] | None = None
    ) -> int: ...
    def append_keyframes(
        self,
        video_id: str,
        keyframes: list[NewKeyframe],
        *,
        live: bool,
        source: str = "",
        metadata: dict[str, str] | None = None,
    ) -> list[NewKeyframe]: ...
    def delete(self, external_ids: list[str]) -> tuple[int, list[str]]: ...

    # reads
    def contains(self, external_id: str) -> bool: ...
    def id_holder(self, external_id: str) -> str | None: ...
    def live_resume(self, stream_id: str) -> LiveResume | None: ...
    def nearest(self, recipe: str, kind: str, query: np.ndarray, k: int) -> list[tuple[VectorRow, float]]: ...
    def nearest_each(
        self, recipe: str, kind: str, queries: np.ndarray, k: int
    ) -> list[list[tuple[VectorRow, float]]]: ...
    def stored(self, recipe: str, kind: str, labels: list[int]) -> np.ndarray: ...
    def transform(self, recipe: str, kind: str, raw: np.ndarray) -> np.ndarray: ...
    def image_vectors(
        self, recipe: str, kind: str, image_ids: list[int]
    ) -> dict[int, tuple[list[VectorRow], np.ndarray]]: ...
    def images(self, image_ids: list[int]) -> dict[int, ImageRow]: ...
    def thumbnails(self, image_ids: list[int]) -> dict[int, bytes]: ...
    def raw_vectors(self, recipe: str, kind: str) -> np.ndarray: ...
    def tagged_vectors(
        self, recipe: str, kind: str, tags: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]: ...

    # per-image aggregates
    def combine(self, recipe: str, aggregate: Aggregate, raw: np.ndarray) -> np.ndarray | None: ...
    def combine_groups(
        self, recipe: str, aggregate: Aggregate, labels: np.ndarray, image_ids: np.ndarray, raw: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...

    # what is learned from the index, and versions
    def learn_whitening(self, recipe: str, kind: str, dims: int | None = None) -> int: ...
    def learned_from(self, recipe: str, kind: str) -> int: ...
    def learned(self, recipe: str, name: str) -> tuple[int, np.ndarray, str] | None: ...
    def save_learned(self, recipe: str, name: str, data: np.ndarray, source: str) -> int: ...

    # counts, persistence
    def stats(self) -> list[SpaceStats]: ...
    def count_images(self) -> int: ...
    def count_videos(self) -> tuple[int, int]: ...
    def recipe_bytes(self, recipe: str) -> int: ...
    def snapshot(self) -> None: ...
    def close(self) -> None: ...
