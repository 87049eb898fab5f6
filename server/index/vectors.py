"""One hnswlib graph per (recipe, kind), saved as atomic snapshots next to the SQLite file."""

from __future__ import annotations

import json
import logging
import os
import threading
import zlib
from pathlib import Path

import hnswlib
import numpy as np

from inserve.server.config import IndexConfig
from inserve.server.index.scoring_table import ScoringTable
from inserve.server.index.store import StoredVectors
from inserve.server.stages.whitening import Whitening, space_transform

log = logging.getLogger(__name__)

WIDEST_EF = 4  # a kNN that reaches fewer than k vectors widens its search up to this many times k...
WHOLE_GRAPH = 20_000  # ...or to the whole graph, when the graph holds at most this many


class VectorSpace:
    """A space's transform (l2-normalisation, or its learned whitening or reduction) and its vectors in memory
    in that space's coordinates (a ScoringTable, for scoring search candidates), with no graph: what such a space
    stores is only read back per image (scoring candidates, the parts of an aggregate), never searched.
    GraphSpace adds the graph."""

    searchable = False

    def __init__(self, dim: int, config: IndexConfig, whitening: Whitening | None, version: int) -> None:
        self.raw_dim = dim
        self.whitening = whitening
        self.version = version
        self.config = config
        self.max_label = 0
        self.table = ScoringTable(self.dim, config.scoring_precision)

    @property
    def dim(self) -> int:
        return self.whitening.dims if self.whitening is not None else self.raw_dim

    def transform(self, raw: np.ndarray) -> np.ndarray:
        return space_transform(self.whitening, raw)

    def __len__(self) -> int:
        return len(self.table)

    @property
    def graph_elements(self) -> int:
        """Vectors the graph holds, deleted ones whose places no new vector has taken yet included."""
        return 0

    def add(self, rows: StoredVectors) -> None:
        """Rows committed to SQLite (each image's at once), transformed into this space."""
        if len(rows):
            self._add(rows, self.transform(rows.raw))

    def _add(self, rows: StoredVectors, vectors: np.ndarray) -> None:
        """Rows with their vectors already in this space's coordinates, into the table."""
        self.table.add(rows.labels, rows.image_ids, vectors, rows.boxes, rows.scores)
        self.max_label = max(self.max_label, int(rows.labels.max()))

    def remove(self, labels: list[int] | np.ndarray) -> None:
        self.table.remove(labels)

    def catch_up(self, rows: StoredVectors) -> None:
        """At start-up: every row SQLite holds, on top of what a snapshot loaded."""
        self.add(rows)

    def reconcile(self, live_labels: np.ndarray) -> None:
        """After catching up with SQLite: nothing to drop, the table is built from SQLite's rows."""

    def missing(self, live_labels: np.ndarray) -> int:
        """How many of SQLite's labels this space lacks after catching up (none: it is built from them)."""
        return 0

    def save(self, path: Path) -> None:
        """Nothing to snapshot: SQLite holds all of it."""

    def load(self, path: Path) -> bool:
        return False


class GraphSpace(VectorSpace):
    """Cosine kNN over the transformed vectors in one hnswlib graph, labels = SQLite labels; the table beside it
    holds the same vectors for scoring."""

    searchable = True

    def __init__(self, dim: int, config: IndexConfig, whitening: Whitening | None, version: int) -> None:
        super().__init__(dim, config, whitening, version)
        self._lock = threading.RLock()
        self._graph = self._new_graph(1024)
        self._live = 0

    def _new_graph(self, capacity: int) -> hnswlib.Index:
        graph = hnswlib.Index(space="ip", dim=self.dim)
        graph.init_index(
            max_elements=capacity,
            ef_construction=self.config.ef_construction,
            M=self.config.hnsw_m,
            allow_replace_deleted=True,
        )
        graph.set_ef(self.config.ef_search)
        return graph

    def __len__(self) -> int:
        return self._live

    @property
    def graph_elements(self) -> int:
        return self._graph.get_current_count()

    def _add(self, rows: StoredVectors, vectors: np.ndarray) -> None:
        """Into the graph and the table. Vectors take the places of deleted vectors first, so the graph does not
        grow with re-indexing. The labels must be new to the graph, which SQLite's AUTOINCREMENT guarantees:
        re-adding a label it holds would leave two elements with it in replace mode (hnswlib#487)."""
        self._add_to_graph(rows.labels, vectors)
        super()._add(rows, vectors)

    def _add_to_graph(self, labels: np.ndarray, vectors: np.ndarray) -> None:
        with self._lock:
            needed = self._graph.get_current_count() + len(labels)
            if needed > self._graph.get_max_elements():
                self._graph.resize_index(max(needed, 2 * self._graph.get_max_elements()))
            self._graph.add_items(vectors, labels.astype(np.uint64), replace_deleted=True)
            self._live += len(labels)

    def catch_up(self, rows: StoredVectors) -> None:
        """Every row into the table; into the graph those above the loaded snapshot's max_label (all of them
        when there was none)."""
        if not len(rows):
            return
        vectors = self.transform(rows.raw)
        newer = rows.labels > self.max_label
        if newer.any():
            self._add_to_graph(rows.labels[newer], vectors[newer])
        super()._add(rows, vectors)

    def remove(self, labels: list[int] | np.ndarray) -> None:
        super().remove(labels)
        with self._lock:
            for label in labels:
                try:
                    self._graph.mark_deleted(int(label))
                    self._live -= 1
                except RuntimeError:  # not in this graph, or deleted already
                    continue

    def knn_each(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Labels and cosine similarities of the k nearest vectors to each of several transformed queries (m, dim),
        best first, from one call to the graph: (m, k') arrays, k' <= k;
        a query that reached fewer vectors than asked has its row padded with label -1 and similarity -inf."""
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        with self._lock:
            k = min(k, self._live)
            if k <= 0:
                return np.zeros((len(queries), 0), dtype=np.int64), np.zeros((len(queries), 0), dtype=np.float32)
            self._graph.set_ef(max(self.config.ef_search, k))
            try:
                labels, distances = self._graph.knn_query(queries, k=k)
                return labels.astype(np.int64), (1.0 - distances).astype(np.float32)
            except RuntimeError:  # one of them reached fewer than k: each on its own
                found = [self._knn_one(query, k) for query in queries]
        width = max(len(labels) for labels, _ in found)
        labels = np.full((len(queries), width), -1, dtype=np.int64)
        sims = np.full((len(queries), width), -np.inf, dtype=np.float32)
        for row, (query_labels, query_sims) in enumerate(found):
            labels[row, : len(query_labels)], sims[row, : len(query_sims)] = query_labels, query_sims
        return labels, sims

    def _knn_one(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """A query that reached fewer than k live vectors: deleted ones whose places no new vector has taken yet
        still route the search but are never returned, and in a graph of tight clusters the search can stop
        short. Widen the search 4x at a time up to WIDEST_EF x k (or the whole of a small graph), then ask for
        fewer: searching the whole of a graph of a million vectors took seconds."""
        widest = max(WIDEST_EF * k, min(self._graph.get_current_count(), WHOLE_GRAPH))
        ef = max(self.config.ef_search, k)
        while k > 0:
            self._graph.set_ef(ef)
            try:
                labels, distances = self._graph.knn_query(query[None], k=k)
                return labels[0].astype(np.int64), (1.0 - distances[0]).astype(np.float32)
            except RuntimeError:
                if ef < widest:
                    ef = min(widest, 4 * ef)
                else:
                    k //= 2
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)

    def stored(self, labels: list[int] | np.ndarray) -> np.ndarray:
        """The vectors of these labels, in this space's coordinates (N, dim), as the table holds them."""
        return self.table.vectors(labels)

    def save(self, path: Path) -> None:
        """Write the graph and its sidecar atomically (temp file, fsync, rename). The sidecar names the
        graph's size and CRC, so a graph and a sidecar from different snapshots (a crash between the two
        renames) or a damaged graph file are never loaded together."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            tmp = _beside(path, ".hnsw.tmp")
            self._graph.save_index(str(tmp))
            size, crc = _size_and_crc(tmp)
            _fsync_replace(tmp, _beside(path, ".hnsw"))
            sidecar = {
                "whitening_version": self.version,
                "max_label": self.max_label,
                "dim": self.dim,
                "raw_dim": self.raw_dim,
                "live": self._live,
                "graph_bytes": size,
                "graph_crc32": crc,
            }
            tmp = _beside(path, ".json.tmp")
            tmp.write_text(json.dumps(sidecar))
            _fsync_replace(tmp, _beside(path, ".json"))

    def load(self, path: Path) -> bool:
        """Load a snapshot written for this whitening version; False when there is none that fits."""
        graph_file, sidecar_file = _beside(path, ".hnsw"), _beside(path, ".json")
        for leftover in (_beside(path, ".hnsw.tmp"), _beside(path, ".json.tmp")):  # a save cut short
            leftover.unlink(missing_ok=True)
        if not (graph_file.exists() and sidecar_file.exists()):
            return False
        try:
            sidecar = json.loads(sidecar_file.read_text())
        except (OSError, ValueError):
            return False
        if _size_and_crc(graph_file) != (sidecar.get("graph_bytes"), sidecar.get("graph_crc32")):
            log.warning("%s does not match its sidecar (size or CRC); rebuilding from SQLite", graph_file)
            return False
        if (sidecar.get("whitening_version"), sidecar.get("dim"), sidecar.get("raw_dim")) != (
            self.version,
            self.dim,
            self.raw_dim,
        ):
            return False
        graph = hnswlib.Index(space="ip", dim=self.dim)
        try:
            graph.load_index(str(graph_file), allow_replace_deleted=True)
        except RuntimeError:
            return False
        graph.set_ef(self.config.ef_search)
        with self._lock:
            self._graph = graph
            self.max_label = int(sidecar["max_label"])
        return True

    def reconcile(self, live_labels: np.ndarray) -> None:
        """After catching up with SQLite: drop from the graph what SQLite no longer holds; count what it does."""
        with self._lock:
            stale = set(int(v) for v in self._graph.get_ids_list()) - set(int(v) for v in live_labels)
            for label in stale:
                try:
                    self._graph.mark_deleted(label)
                except RuntimeError:  # deleted before the snapshot was written
                    continue
            self._live = len(live_labels)

    def missing(self, live_labels: np.ndarray) -> int:
        """Labels SQLite holds that the graph lacks: a snapshot that disagrees with SQLite below its max_label,
        as another process writing the same directory leaves it (catching up only reads labels above)."""
        with self._lock:
            return len(set(int(v) for v in live_labels) - set(int(v) for v in self._graph.get_ids_list()))


def _beside(path: Path, suffix: str) -> Path:
    """`graphs/gem.global` -> `graphs/gem.global.hnsw` (with_suffix would drop the kind and let two spaces
    of one recipe overwrite each other's snapshot)."""
    return path.with_name(path.name + suffix)


def _size_and_crc(file: Path) -> tuple[int, int]:
    crc, size = 0, 0
    with file.open("rb") as f:
        while block := f.read(1 << 20):
            crc, size = zlib.crc32(block, crc), size + len(block)
    return size, crc


def _fsync_replace(tmp: Path, final: Path) -> None:
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    directory = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def vector_space(
    dim: int, config: IndexConfig, whitening: Whitening | None, version: int, searchable: bool
) -> VectorSpace:
    """A space with a graph when it is searched (SpaceSpec.searchable), without one otherwise."""
    return (GraphSpace if searchable else VectorSpace)(dim, config, whitening, version)
