"""The index of a data directory: SQLite metadata and raw vectors, one HNSW graph per vector space."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from pathlib import Path

import numpy as np

from inserve.server.config import IndexConfig, milvus_uri
from inserve.server.errors import ConfigError
from inserve.server.index.codec import as_stored
from inserve.server.index.data_dir import INDEX_FILE, DataDirLock
from inserve.server.index.locking import ReadWriteLock
from inserve.server.index.protocol import Index, Space
from inserve.server.index.scoring_table import NO_CANDIDATES, Candidates
from inserve.server.index.space_rules import SpaceRules
from inserve.server.index.spaces import (
    DEFAULT_SPEC,
    NOT_SEARCHED,
    Aggregate,
    Learned,
    SpaceSpec,
    SpaceStats,
)
from inserve.server.index.store import (
    DuplicateId,
    ImageRow,
    LiveResume,
    MetadataStore,
    NewKeyframe,
    NewVectors,
    StoredVectors,
    VectorRow,
    Written,
)
from inserve.server.index.transforms import compact, learn_transform, training_vectors
from inserve.server.index.vectors import GraphSpace, VectorSpace, vector_space
from inserve.server.stages.whitening import Whitening

__all__ = [
    "DEFAULT_SPEC",
    "Aggregate",
    "DuplicateId",
    "ImageRow",
    "Index",
    "InstanceIndex",
    "Learned",
    "MetadataStore",
    "NewKeyframe",
    "NewVectors",
    "Space",
    "SpaceSpec",
    "SpaceStats",
    "VectorRow",
    "open_index",
]

log = logging.getLogger(__name__)


class InstanceIndex(SpaceRules):
    """Durable image index: writes commit to SQLite first, then go into the in-memory graphs. Holds the data
    directory's lock (DataDirInUse when another process has it) until `close`."""

    def __init__(
        self,
        data_dir: Path,
        config: IndexConfig = IndexConfig(),
        specs: Mapping[tuple[str, str], SpaceSpec] | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.config = config
        self.specs = dict(specs or {})
        self._dir_lock = DataDirLock(self.data_dir)
        try:
            self.store = MetadataStore(
                self.data_dir / INDEX_FILE, [key for key, spec in self.specs.items() if compact(spec, config)]
            )
            self._spaces: dict[tuple[str, str], VectorSpace] = {}
            self._lock = ReadWriteLock()  # searches read together; writes (under .writing()) land whole
            self._added_since_snapshot = 0
            for recipe, kind, dim, _ in self.store.spaces():
                if self.spec(recipe, kind).aggregate is None:
                    self._spaces[(recipe, kind)] = self._open_space(recipe, kind, dim)
            for recipe, kind in self._aggregates():
                self._build_aggregate(recipe, kind)
        except BaseException:
            self._dir_lock.release()
            raise

    def reading(self) -> AbstractContextManager[None]:
        """Held by a search that reads the index in several steps (graphs, then SQLite rows, then more for
        re-ranking): no write lands in between, so it sees each write whole or not at all."""
        return self._lock.reading()

    def _snapshot_path(self, recipe: str, kind: str) -> Path:
        return self.data_dir / "graphs" / f"{recipe}.{kind}"

    def _new_space(
        self, recipe: str, kind: str, dim: int, whitening: Whitening | None = None, version: int = 0
    ) -> VectorSpace:
        return vector_space(dim, self.config, whitening, version, self.spec(recipe, kind).searchable)

    def _open_space(self, recipe: str, kind: str, dim: int) -> VectorSpace:
        """Snapshot if it fits the current whitening, then whatever SQLite holds beyond it."""
        version, whitening = self.store.whitening(recipe, kind)
        space = self._new_space(recipe, kind, dim, whitening, version)
        loaded = space.load(self._snapshot_path(recipe, kind))
        rows = self.store.vectors(recipe, kind)  # all of them: the scoring table holds every one
        caught_up = int((rows.labels > space.max_label).sum()) if loaded else len(rows)
        space.catch_up(rows)
        if loaded and (lacking := space.missing(rows.labels)):
            log.warning(
                "%s/%s: the snapshot lacks %d vectors that SQLite holds (another process wrote this directory); "
                "rebuilding from SQLite",
                recipe,
                kind,
                lacking,
            )
            space, loaded, caught_up = self._new_space(recipe, kind, dim, whitening, version), False, len(rows)
            space.catch_up(rows)
        space.reconcile(rows.labels)
        log.info(
            "%s/%s: %d vectors (%s, %d caught up from SQLite)",
            recipe,
            kind,
            len(space),
            "snapshot" if loaded else "rebuilt",
            caught_up,
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
        with self._lock.writing():
            written, removed = self.store.add_image(
                external_id, source, width, height, metadata or {}, vectors, replace=replace, thumbnail=thumbnail
            )
            for space in self._spaces.values():
                space.remove(removed)
            self._add_vectors(vectors, written)
        return written.image_id

    def replace_video(
        self, video_id: str, keyframes: list[NewKeyframe], *, source: str = "", metadata: dict[str, str] | None = None
    ) -> int:
        """Replace all keyframes of a video atomically (one SQLite transaction; the graphs follow under the
        index lock, so no search sees a mix). Returns how many keyframes were replaced."""
        with self._lock.writing():
            written, removed, replaced = self.store.replace_video(video_id, source, metadata or {}, keyframes)
            for space in self._spaces.values():
                space.remove(removed)
            for keyframe, keyframe_written in zip(keyframes, written):
                self._add_vectors(keyframe.vectors, keyframe_written)
        return replaced

    def append_keyframes(
        self,
        video_id: str,
        keyframes: list[NewKeyframe],
        *,
        live: bool,
        source: str = "",
        metadata: dict[str, str] | None = None,
    ) -> list[NewKeyframe]:
        """Add keyframes to a video atomically, skipping any stored already. Returns those added."""
        with self._lock.writing():
            added = self.store.append_keyframes(video_id, source, metadata or {}, keyframes, live)
            for keyframe, written in added:
                self._add_vectors(keyframe.vectors, written)
        return [keyframe for keyframe, _ in added]

    def _add_vectors(self, vectors: list[NewVectors], written: Written) -> None:
        """Committed vectors into their spaces and their images' aggregates (under the index lock); snapshots
        when due."""
        for v in vectors:
            key = (v.recipe, v.kind)
            if key not in self._spaces:
                self._spaces[key] = self._new_space(*key, v.raw.shape[1])
            self._spaces[key].add(self._as_stored(written.of(v), key))
            self._added_since_snapshot += len(v.raw)
        for v in vectors:
            for recipe, kind in self._aggregates(v.recipe, v.kind):
                self._aggregate_image(recipe, kind, self._as_stored(written.of(v), (v.recipe, v.kind)))
        if self._added_since_snapshot >= self.config.snapshot_every:
            self.snapshot()

    def _as_stored(self, rows: StoredVectors, key: tuple[str, str]) -> StoredVectors:
        """Rows with their raw vectors as SQLite gives them back (int8 in compact spaces): a space filled write
        by write then holds what a space rebuilt at start-up holds."""
        return replace(rows, raw=as_stored(rows.raw, key in self.store.int8_spaces))

    def delete(self, external_ids: list[str]) -> tuple[int, list[str]]:
        """Delete images; returns how many were deleted and the ids that were not indexed (an id given twice
        counts once)."""
        unique = list(dict.fromkeys(external_ids))
        with self._lock.writing():
            labels, missing = self.store.delete_images(unique)
            for space in self._spaces.values():
                space.remove(labels)
        return len(unique) - len(missing), missing

    def contains(self, external_id: str) -> bool:
        return self.store.has_image(external_id)

    def space(self, recipe: str, kind: str) -> VectorSpace | None:
        return self._spaces.get((recipe, kind))

    def nearest(self, recipe: str, kind: str, query: np.ndarray, k: int) -> list[tuple[VectorRow, float]]:
        """The k nearest stored vectors of a space to a query in the space's own (transformed)
        coordinates, with cosine similarity."""
        return self.nearest_each(recipe, kind, np.atleast_2d(query), k)[0]

    def nearest_each(self, recipe: str, kind: str, queries: np.ndarray, k: int) -> list[list[tuple[VectorRow, float]]]:
        """`nearest` for each of several queries (N, dim), in one graph search; rows from the scoring table."""
        if (recipe, kind) not in self._spaces:
            return [[] for _ in queries]
        graph = self._graph(recipe, kind)
        labels, sims = graph.knn_each(queries, k)
        rows = graph.table.rows(labels.ravel())
        return [
            [(rows[label], float(sim)) for label, sim in zip(query_labels, query_sims) if label in rows]
            for query_labels, query_sims in zip(labels.tolist(), sims.tolist())
        ]

    def nearest_images(self, recipe: str, kind: str, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The image and similarity of each query's k nearest vectors, (m, k') arrays best first (k' <= k)."""
        if (recipe, kind) not in self._spaces:
            return np.zeros((len(queries), 0), np.int64), np.zeros((len(queries), 0), np.float32)
        graph = self._graph(recipe, kind)
        labels, sims = graph.knn_each(queries, k)
        return graph.table.image_ids(labels), sims

    def stored(self, recipe: str, kind: str, labels: list[int]) -> np.ndarray:
        """Vectors of a searchable space as it compares them (transformed), for query expansion."""
        return self._graph(recipe, kind).stored(labels)

    def _graph(self, recipe: str, kind: str) -> GraphSpace:
        space = self._spaces[(recipe, kind)]
        if not isinstance(space, GraphSpace):
            raise ValueError(f"{recipe}/{kind} {NOT_SEARCHED}")
        return space

    def image_vectors(
        self, recipe: str, kind: str, image_ids: list[int]
    ) -> dict[int, tuple[list[VectorRow], np.ndarray]]:
        """Each image's rows and transformed vectors in a space (re-ranking regions, the parts of an aggregate);
        images without any are left out. From the scoring table, which holds them transformed."""
        found = self.candidates(recipe, kind, image_ids)
        return {
            int(image_id): (found.image_rows(i), found.vectors[found.offsets[i] : found.offsets[i + 1]])
            for i, image_id in enumerate(found.image_ids)
        }

    def candidates(self, recipe: str, kind: str, image_ids: list[int] | np.ndarray) -> Candidates:
        """The vectors of these images in a space, grouped by image, from memory (the scoring table)."""
        space = self._spaces.get((recipe, kind))
        return space.table.gather(image_ids) if space is not None else NO_CANDIDATES

    def _build_aggregate(self, recipe: str, kind: str) -> None:
        """(Re)build an aggregate space from all its parts, with its current whitening when one fits."""
        with self._lock.writing():
            aggregate = self.spec(recipe, kind).aggregate
            labels, image_ids, raw = self.store.space_vectors(recipe, aggregate.source)
            ids, first, vectors = self.combine_groups(recipe, aggregate, labels, image_ids, raw)
            self._spaces.pop((recipe, kind), None)
            if len(first) == 0:
                return
            version, whitening = self.store.whitening(recipe, kind)
            if whitening is not None and whitening.mean.shape[0] != vectors.shape[1]:
                version, whitening = 0, None
            space = self._new_space(recipe, kind, vectors.shape[1], whitening, version)
            space.add(StoredVectors(first, ids, vectors))
            self._spaces[(recipe, kind)] = space

    def _aggregate_image(self, recipe: str, kind: str, parts: StoredVectors) -> None:
        """An image's aggregate from its parts, labelled by its first part."""
        if len(parts) == 0:
            return
        aggregate = self.spec(recipe, kind).aggregate
        combined = self.combine(recipe, aggregate, parts.raw)
        if combined is None:
            return
        space = self._spaces.get((recipe, kind))
        if space is None:
            space = self._new_space(recipe, kind, len(combined))
            self._spaces[(recipe, kind)] = space
        space.add(StoredVectors(parts.labels.min(keepdims=True), parts.image_ids[:1], combined[None]))

    def save_learned(self, recipe: str, name: str, data: np.ndarray, source: str) -> int:
        """Store a new version of a recipe's learned model and rebuild the aggregates that use it."""
        with self._lock.writing():
            version = self.store.save_learned(recipe, name, data, source)
            for key in self._aggregates(recipe):
                self._build_aggregate(*key)
            return version

    def learned(self, recipe: str, name: str) -> tuple[int, np.ndarray, str] | None:
        return self.store.learned(recipe, name)

    def recipe_bytes(self, recipe: str) -> int:
        """What a recipe costs the index: raw vectors in SQLite plus the level-0 HNSW entries of its graphs
        (vector, 2M links and their count, label)."""
        total = self.store.space_bytes(recipe)
        for (name, _), space in self._spaces.items():
            if name == recipe and space.searchable:
                total += len(space) * (4 * space.dim + 4 * (2 * self.config.hnsw_m + 1) + 8)
        return total

    def images(self, image_ids: list[int]) -> dict[int, ImageRow]:
        return self.store.image_rows(image_ids)

    def thumbnails(self, image_ids: list[int]) -> dict[int, bytes]:
        return self.store.thumbnails(image_ids)

    def id_holder(self, external_id: str) -> str | None:
        """What holds an id in the shared namespace of images and videos: "image", "video" or None."""
        return self.store.id_holder(external_id)

    def live_resume(self, stream_id: str) -> LiveResume | None:
        return self.store.live_resume(stream_id)

    def claim_live(self, stream_id: str) -> AbstractContextManager[None]:
        """Nothing to claim beyond this process: the data directory's lock keeps every other one out."""
        return nullcontext()

    def count_videos(self) -> tuple[int, int]:
        """Videos and keyframes indexed."""
        return self.store.count_videos()

    def learned_from(self, recipe: str, kind: str) -> int:
        """How many vectors the space's current transform was learned from (0: none learned)."""
        return self.store.learned_from(recipe, kind)

    def tagged_vectors(
        self, recipe: str, kind: str, tags: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Labels, image ids, tags and raw vectors of a space's vectors whose tag is one of `tags`."""
        return self.store.tagged_vectors(recipe, kind, tags)

    def raw_vectors(self, recipe: str, kind: str) -> np.ndarray:
        """Every raw vector of a space (N, D), in label order."""
        return self.store.space_vectors(recipe, kind)[2]

    def learn_whitening(self, recipe: str, kind: str, dims: int | None = None) -> int:
        """Learn the space's transform (transforms.learn_transform) from its raw vectors, rebuild its
        graph; returns the new version. Aggregates of the space are rebuilt on the new whitening (and their own
        whitening re-learned).

        The new graph is built beside the one in use, while searches and writes go on; only catching up with
        what was written meanwhile and the swap hold the writer lock (a compact space re-learns as it doubles,
        and rebuilding 64k vectors takes seconds)."""
        spec = self.spec(recipe, kind)
        if spec.aggregate is not None:
            with self._lock.writing():
                labels, image_ids, raw = self.store.space_vectors(recipe, spec.aggregate.source)
                training = self.combine_groups(recipe, spec.aggregate, labels, image_ids, raw)[2]
                whitening = learn_transform(spec, self.config, training, dims)
                self.store.ensure_space(recipe, kind, training.shape[1])
                version = self.store.save_whitening(recipe, kind, whitening, len(training))
                self._build_aggregate(recipe, kind)
        else:
            rows = self.store.vectors(recipe, kind)  # one read: training and the new space
            training = training_vectors(spec, rows.image_ids, rows.raw)
            whitening = learn_transform(spec, self.config, training, dims)
            space = self._new_space(recipe, kind, rows.raw.shape[1], whitening)
            space.add(rows)
            with self._lock.writing():
                version = space.version = self.store.save_whitening(recipe, kind, whitening, len(training))
                space.add(self.store.vectors(recipe, kind, after_label=space.max_label))
                live = self.store.labels(recipe, kind)
                space.remove(np.setdiff1d(rows.labels, live))  # deleted meanwhile
                space.reconcile(live)
                self._spaces[(recipe, kind)] = space
                space.save(self._snapshot_path(recipe, kind))
                for key in self._aggregates(recipe, kind):
                    self._build_aggregate(*key)
                    if self.spec(*key).whiten and self._spaces.get(key) is not None and self._spaces[key].version:
                        self.learn_whitening(*key)
        log.info(
            "%s/%s: whitening v%d, %d -> %d dims, from %d vectors",
            recipe,
            kind,
            version,
            training.shape[1],
            whitening.dims,
            len(training),
        )
        return version

    def stats(self) -> list[SpaceStats]:
        return [
            SpaceStats(recipe, kind, len(space), space.dim, space.version)
            for (recipe, kind), space in sorted(self._spaces.items())
        ]

    def count_images(self) -> int:
        return self.store.count_images()

    def snapshot(self) -> None:
        with self._lock.writing():
            for (recipe, kind), space in self._spaces.items():
                space.save(self._snapshot_path(recipe, kind))
            self._added_since_snapshot = 0

    def close(self) -> None:
        try:
            self.snapshot()
            self.store.close()
        finally:
            self._dir_lock.release()


def open_index(data_dir: Path, store: str, config: IndexConfig, specs: Mapping[tuple[str, str], SpaceSpec]) -> Index:
    """The index a configuration names: the data directory's hnswlib + SQLite, or a shared Milvus store
    (`store`: milvus://HOST:PORT or a milvus-lite file *.db; ServerConfig.store). Both answer InstanceIndex's
    interface (server/index/protocol.py); the Milvus one (server/index/milvus.py) holds no state of its own, so
    replicas can share it."""
    uri = milvus_uri(store) if store else None
    if uri is None:
        return InstanceIndex(data_dir, config, specs)
    try:
        from inserve.server.index.milvus import MilvusIndex
    except ImportError as exc:
        raise ConfigError(f"--store {store} needs pymilvus and milvus-lite: pip install 'inserve[cluster]'") from exc
    return MilvusIndex(uri, config, specs)
