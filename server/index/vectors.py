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
from inserve.server.stages.whitening import Whitening, space_transform

log = logging.getLogger(__name__)


class VectorSpace:
    """A space's transform (l2-normalisation, or its learned whitening or reduction) and its live labels, with
    no graph: what such a space stores is only read back per image (re-ranking regions, the parts of an
    aggregate), never searched, so it only counts and transforms. GraphSpace adds the graph."""

    searchable = False

    def __init__(self, dim: int, config: IndexConfig, whitening: Whitening | None, version: int) -> None:
        self.raw_dim = dim
        self.whitening = whitening
        self.version = version
        self.config = config
        self.max_label = 0
        self._lock = threading.RLock()
        self._labels: set[int] = set()

    @property
    def dim(self) -> int:
        return self.whitening.dims if self.whitening is not None else self.raw_dim

    def transform(self, raw: np.ndarray) -> np.ndarray:
        return space_transform(self.whitening, raw)

    def __len__(self) -> int:
        return len(self._labels)

    @property
    def graph_elements(self) -> int:
        """Vectors the graph holds, deleted ones whose places no new vector has taken yet included."""
        return 0

    def add(self, labels: np.ndarray, raw: np.ndarray) -> None:
        if len(labels):
            with self._lock:
                self._labels.update(int(v) for v in labels)
                self.max_label = max(self.max_label, int(labels.max()))

    def remove(self, labels: list[int] | np.ndarray) -> None:
        with self._lock:
            self._labels.difference_update(int(v) for v in labels)

    def reconcile(self, live_labels: np.ndarray) -> None:
        """After catching up with SQLite: count what it holds."""
        with self._lock:
            self._labels = set(int(v) for v in live_labels)

    def missing(self, live_labels: np.ndarray) -> int:
        """How many of SQLite's labels this space lacks after catching up (none: it holds only labels)."""
        return 0

    def save(self, path: Path) -> None:
        """Nothing to snapshot: SQLite holds all of it."""

    def load(self, path: Path) -> bool:
        return False


class GraphSpace(VectorSpace):
    """Cosine kNN over the transformed vectors in one hnswlib graph, labels = SQLite labels."""

    searchable = True

    def __init__(self, dim: int, config: IndexConfig, whitening: Whitening | None, version: int) -> None:
        super().__init__(dim, config, whitening, version)
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

    def add(self, labels: np.ndarray, raw: np.ndarray) -> None:
        if len(labels):
            self.add_transformed(labels, self.transform(raw))

    def add_transformed(self, labels: np.ndarray, vectors: np.ndarray) -> None:
        """Add vectors already in this space's coordinates (aggregates are built that way). They take the
        places of deleted vectors first, so the graph does not grow with re-indexing. The labels must be new
        to the graph, which SQLite's AUTOINCREMENT guarantees: re-adding a label it holds would leave two
        elements with it in replace mode (hnswlib#487)."""
        with self._lock:
            needed = self._graph.get_current_count() + len(labels)
            if needed > self._graph.get_max_elements():
                self._graph.resize_index(max(needed, 2 * self._graph.get_max_elements()))
            self._graph.add_items(vectors, labels.astype(np.uint64), replace_deleted=True)
            self._live += len(labels)
            self.max_label = max(self.max_label, int(labels.max()))

    def remove(self, labels: list[int] | np.ndarray) -> None:
        with self._lock:
            for label in labels:
                try:
                    self._graph.mark_deleted(int(label))
                    self._live -= 1
                except RuntimeError:  # not in this graph, or deleted already
                    continue

    def knn(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Labels and cosine similarities of the k nearest vectors to a transformed query, best first."""
        query = np.atleast_2d(np.asarray(query, dtype=np.float32))
        with self._lock:
            k = min(k, self._live)
            ef = max(self.config.ef_search, k)
            while k > 0:
                self._graph.set_ef(ef)
                try:
                    labels, distances = self._graph.knn_query(query, k=k)
                    return labels[0].astype(np.int64), (1.0 - distances[0]).astype(np.float32)
                except RuntimeError:
                    # fewer than k live vectors reached: deleted ones whose places no new vector has taken yet
                    # (deleted images) still route the search but are never returned. Search the whole graph,
                    # then ask for fewer.
                    if ef < self._graph.get_current_count():
                        ef = self._graph.get_current_count()
                    else:
                        k //= 2
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)

    def stored(self, labels: list[int] | np.ndarray) -> np.ndarray:
        """The vectors the graph holds for these labels, in this space's coordinates (N, dim)."""
        with self._lock:
            found = self._graph.get_items([int(v) for v in labels], return_type="numpy")
        return found.astype(np.float32, copy=False).reshape(-1, self.dim)

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
        """After catching up with SQLite: drop what SQLite no longer holds; count what it does."""
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
