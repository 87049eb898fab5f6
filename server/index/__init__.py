"""The index of a data directory: SQLite metadata and raw vectors, one HNSW graph per vector space."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from inserve.server.config import IndexConfig
from inserve.server.index.store import DuplicateId, ImageRow, MetadataStore, NewKeyframe, NewVectors, VectorRow
from inserve.server.index.vectors import VectorSpace
from inserve.server.stages.whitening import pca_whiten

__all__ = ["DuplicateId", "ImageRow", "InstanceIndex", "NewKeyframe", "NewVectors", "SpaceStats", "VectorRow"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpaceStats:
    recipe: str
    kind: str
    vectors: int
    dim: int
    whitening_version: int


class InstanceIndex:
    """Durable image index: writes commit to SQLite first, then go into the in-memory graphs."""

    def __init__(self, data_dir: Path, config: IndexConfig = IndexConfig()) -> None:
        self.data_dir = Path(data_dir)
        self.config = config
        self.store = MetadataStore(self.data_dir / "index.sqlite")
        self._spaces: dict[tuple[str, str], VectorSpace] = {}
        self._lock = threading.RLock()
        self._added_since_snapshot = 0
        for recipe, kind, dim, _ in self.store.spaces():
            self._spaces[(recipe, kind)] = self._open_space(recipe, kind, dim)

    def _snapshot_path(self, recipe: str, kind: str) -> Path:
        return self.data_dir / "graphs" / f"{recipe}.{kind}"

    def _open_space(self, recipe: str, kind: str, dim: int) -> VectorSpace:
        """Snapshot if it fits the current whitening, then whatever SQLite holds beyond it."""
        version, whitening = self.store.whitening(recipe, kind)
        space = VectorSpace(dim, self.config, whitening, version)
        loaded = space.load(self._snapshot_path(recipe, kind))
        labels, raw = self.store.vectors(recipe, kind, after_label=space.max_label if loaded else 0)
        space.add(labels, raw)
        space.reconcile(self.store.labels(recipe, kind))
        log.info(
            "%s/%s: %d vectors (%s, %d caught up from SQLite)",
            recipe,
            kind,
            len(space),
            "snapshot" if loaded else "rebuilt",
            len(labels),
        )
        return space

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
    ) -> int:
        """Index one image atomically; raises DuplicateId unless `replace`. Returns its row id."""
        with self._lock:
            image_id, labels, removed = self.store.add_image(
                external_id, source, width, height, metadata or {}, vectors, replace=replace, thumbnail=thumbnail
            )
            for space in self._spaces.values():
                space.remove(removed)
            self._add_vectors(vectors, labels)
        return image_id

    def replace_video(
        self, video_id: str, keyframes: list[NewKeyframe], *, source: str = "", metadata: dict[str, str] | None = None
    ) -> int:
        """Replace all keyframes of a video atomically (one SQLite transaction; the graphs follow under the
        index lock, so no search sees a mix). Returns how many keyframes were replaced."""
        with self._lock:
            labels, removed, replaced = self.store.replace_video(video_id, source, metadata or {}, keyframes)
            for space in self._spaces.values():
                space.remove(removed)
            for keyframe, keyframe_labels in zip(keyframes, labels):
                self._add_vectors(keyframe.vectors, keyframe_labels)
        return replaced

    def _add_vectors(self, vectors: list[NewVectors], labels: dict[tuple[str, str], np.ndarray]) -> None:
        """Committed vectors into their graphs (under the index lock); snapshots when due."""
        for v in vectors:
            key = (v.recipe, v.kind)
            if key not in self._spaces:
                self._spaces[key] = VectorSpace(v.raw.shape[1], self.config, None, 0)
            self._spaces[key].add(labels[key], v.raw)
            self._added_since_snapshot += len(labels[key])
        if self._added_since_snapshot >= self.config.snapshot_every:
            self.snapshot()

    def delete(self, external_ids: list[str]) -> tuple[int, list[str]]:
        """Delete images; returns how many were deleted and the ids that were not indexed."""
        with self._lock:
            labels, missing = self.store.delete_images(external_ids)
            for space in self._spaces.values():
                space.remove(labels)
        return len(external_ids) - len(missing), missing

    def contains(self, external_id: str) -> bool:
        return self.store.has_image(external_id)

    def space(self, recipe: str, kind: str) -> VectorSpace | None:
        return self._spaces.get((recipe, kind))

    def nearest(self, recipe: str, kind: str, query: np.ndarray, k: int) -> list[tuple[VectorRow, float]]:
        """The k nearest stored vectors of a space to a query in the space's own (transformed)
        coordinates, with cosine similarity."""
        space = self._spaces.get((recipe, kind))
        if space is None:
            return []
        labels, sims = space.knn(query, k)
        rows = self.store.vector_rows(labels)
        return [(rows[int(label)], float(sim)) for label, sim in zip(labels, sims) if int(label) in rows]

    def images(self, image_ids: list[int]) -> dict[int, ImageRow]:
        return self.store.image_rows(image_ids)

    def learn_whitening(self, recipe: str, kind: str, dims: int | None = None) -> int:
        """Learn PCA-whitening from the space's raw vectors, rebuild its graph; returns the new version."""
        with self._lock:
            labels, raw = self.store.vectors(recipe, kind)
            if len(labels) < 2:
                raise ValueError(f"{recipe}/{kind} holds {len(labels)} vectors; whitening needs more")
            whitening = pca_whiten(raw, dims or self.config.whiten_dims)
            version = self.store.save_whitening(recipe, kind, whitening, len(labels))
            space = VectorSpace(raw.shape[1], self.config, whitening, version)
            space.add(labels, raw)
            space.reconcile(labels)
            self._spaces[(recipe, kind)] = space
            space.save(self._snapshot_path(recipe, kind))
            log.info(
                "%s/%s: whitening v%d, %d -> %d dims, from %d vectors",
                recipe,
                kind,
                version,
                raw.shape[1],
                whitening.dims,
                len(labels),
            )
            return version

    def can_whiten(self, recipe: str, kind: str) -> bool:
        """True when a space holds enough vectors per dimension (IndexConfig.auto_whiten_per_dim) to learn
        a stable whitening."""
        space = self._spaces.get((recipe, kind))
        per_dim = self.config.auto_whiten_per_dim
        return bool(space is not None and per_dim > 0 and len(space) >= per_dim * space.raw_dim)

    def whitening_due(self, recipe: str, kind: str) -> bool:
        """True when a space that was never whitened can be."""
        space = self._spaces.get((recipe, kind))
        return space is not None and space.version == 0 and self.can_whiten(recipe, kind)

    def stats(self) -> list[SpaceStats]:
        return [
            SpaceStats(recipe, kind, len(space), space.dim, space.version)
            for (recipe, kind), space in sorted(self._spaces.items())
        ]

    def count_images(self) -> int:
        return self.store.count_images()

    def snapshot(self) -> None:
        with self._lock:
            for (recipe, kind), space in self._spaces.items():
                space.save(self._snapshot_path(recipe, kind))
            self._added_since_snapshot = 0

    def close(self) -> None:
        self.snapshot()
        self.store.close()
