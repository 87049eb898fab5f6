"""A space's vectors in memory, in the form a search compares them in: one contiguous matrix of transformed
vectors with each row's image, label, box and score, rows of one image side by side. Scoring the candidates of a
search then gathers their rows with numpy and needs no SQLite read and no loop over images in Python.

Rows are appended as images are written, each image's side by side; a delete marks rows dead, and the table
is compacted once half of it is dead. Lookups by label and by image are arrays indexed by the label and the
image's row id (both SQLite AUTOINCREMENT integers), 4 and 16 bytes per id ever used.
Memory per row: the vector (2 bytes a dim in float16, 4 in float32) + 37 bytes.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from inserve.server.index.store import VectorRow

NO_ROW = -1
NO_BOX = np.full(4, np.nan, dtype=np.float32)  # the box of a vector without one (a whole-image vector)
MIN_COMPACT = 4096  # dead rows below this are never worth a compaction


@dataclass(frozen=True)
class Candidates:
    """The rows of some images, grouped: image i's are rows offsets[i]:offsets[i + 1] of the arrays."""

    image_ids: np.ndarray  # (n,) int64, images with at least one row, in the order asked
    offsets: np.ndarray  # (n + 1,) int64
    vectors: np.ndarray  # (R, dim) float32, in the space's coordinates
    labels: np.ndarray  # (R,) int64
    boxes: np.ndarray  # (R, 4) float32, NaN where a vector has no box
    scores: np.ndarray  # (R,) float32

    @property
    def segments(self) -> np.ndarray:
        """The first row of each image: what numpy's reduceat takes."""
        return self.offsets[:-1]

    def __len__(self) -> int:
        return len(self.image_ids)

    @staticmethod
    def of_groups(image_ids: np.ndarray, groups: dict[int, tuple[list[VectorRow], np.ndarray]]) -> Candidates:
        """The candidates of a store that reads each image's rows as records (`Index.image_vectors`'s form)."""
        held = [int(i) for i in image_ids if int(i) in groups and len(groups[int(i)][0])]
        rows = [row for i in held for row in groups[i][0]]
        if not rows:
            return NO_CANDIDATES
        return Candidates(
            np.asarray(held, np.int64),
            np.r_[0, np.cumsum([len(groups[i][0]) for i in held])].astype(np.int64),
            np.concatenate([groups[i][1] for i in held]).astype(np.float32),
            np.asarray([row.label for row in rows], np.int64),
            np.asarray([NO_BOX if row.box is None else row.box for row in rows], np.float32),
            np.asarray([row.score for row in rows], np.float32),
        )

    def image_rows(self, i: int) -> list[VectorRow]:
        """The rows of the i-th image as the index's row records."""
        a, b = self.offsets[i], self.offsets[i + 1]
        image_id = int(self.image_ids[i])
        return [_row(*fields, image_id) for fields in zip(self.labels[a:b], self.boxes[a:b], self.scores[a:b])]


def _row(label: int, box: np.ndarray, score: float, image_id: int) -> VectorRow:
    corners = None if np.isnan(box[0]) else tuple(float(c) for c in box)
    return VectorRow(int(label), int(image_id), corners, float(score))


NO_CANDIDATES = Candidates(
    np.zeros(0, np.int64),
    np.zeros(1, np.int64),
    np.zeros((0, 0), np.float32),
    np.zeros(0, np.int64),
    np.zeros((0, 4), np.float32),
    np.zeros(0, np.float32),
)


def _grown(array: np.ndarray, size: int, fill: float | int) -> np.ndarray:
    """`array` with at least `size` entries along its first axis (doubling), new ones `fill`."""
    if len(array) >= size:
        return array
    grown = np.full((max(size, 2 * len(array)), *array.shape[1:]), fill, dtype=array.dtype)
    grown[: len(array)] = array
    return grown


class ScoringTable:
    """Thread-safe: writes and reads take the table's own lock (the index's lock orders them with the graph)."""

    def __init__(self, dim: int, dtype: str = "float16") -> None:
        self.dim, self.dtype = dim, np.dtype(dtype)
        self._lock = threading.Lock()
        self._size = 0  # rows in use, dead ones included
        self._dead = 0
        self._vectors = np.zeros((0, dim), dtype=self.dtype)
        self._labels = np.zeros(0, dtype=np.int64)
        self._image_ids = np.zeros(0, dtype=np.int64)
        self._boxes = np.zeros((0, 4), dtype=np.float32)
        self._scores = np.zeros(0, dtype=np.float32)
        self._alive = np.zeros(0, dtype=bool)
        self._row_of_label = np.zeros(0, dtype=np.int32)
        self._image_rows = np.zeros((0, 2), dtype=np.int64)  # per image id: its rows [start, stop); 0, 0: none

    def __len__(self) -> int:
        return self._size - self._dead

    @property
    def nbytes(self) -> int:
        arrays = (self._vectors, self._labels, self._image_ids, self._boxes, self._scores, self._alive)
        return sum(a.nbytes for a in (*arrays, self._row_of_label, self._image_rows))

    def add(
        self,
        labels: np.ndarray,
        image_ids: np.ndarray,
        vectors: np.ndarray,
        boxes: np.ndarray | None = None,
        scores: np.ndarray | None = None,
    ) -> None:
        """Rows of images new to the table, in any order (grouped by image here): an image's vectors of a space
        are written at once, and a replaced image comes back under a new row id."""
        n = len(labels)
        if n == 0:
            return
        labels, image_ids = np.asarray(labels, np.int64), np.asarray(image_ids, np.int64)
        order = np.argsort(image_ids, kind="stable")  # each image's rows side by side, in label order
        labels, image_ids, vectors = labels[order], image_ids[order], np.asarray(vectors)[order]
        boxes = None if boxes is None else np.asarray(boxes)[order]
        scores = None if scores is None else np.asarray(scores)[order]
        with self._lock:
            if (self._image_rows[image_ids[image_ids < len(self._image_rows)], 1] > 0).any():
                raise ValueError("an image's rows are added to a space at once; this one has rows already")
            end = self._size + n
            self._vectors = _grown(self._vectors, end, 0)
            self._labels, self._image_ids = _grown(self._labels, end, 0), _grown(self._image_ids, end, 0)
            self._boxes, self._scores = _grown(self._boxes, end, np.nan), _grown(self._scores, end, 0)
            self._alive = _grown(self._alive, end, False)
            rows = slice(self._size, end)
            self._vectors[rows] = vectors
            self._labels[rows], self._image_ids[rows] = labels, image_ids
            self._boxes[rows] = NO_BOX if boxes is None else boxes
            self._scores[rows] = 0.0 if scores is None else scores
            self._alive[rows] = True
            self._row_of_label = _grown(self._row_of_label, int(labels.max()) + 1, NO_ROW)
            self._row_of_label[labels] = np.arange(self._size, end, dtype=np.int32)
            self._index_images(self._size, end)
            self._size = end

    def _index_images(self, start: int, stop: int) -> None:
        """Each image's [start, stop) among rows start:stop, which hold every row of each of their images."""
        ids = self._image_ids[start:stop]
        firsts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
        self._image_rows = _grown(self._image_rows, int(ids.max()) + 1, 0)
        self._image_rows[ids[firsts]] = np.stack([firsts, np.r_[firsts[1:], len(ids)]], axis=1) + start

    def remove(self, labels: np.ndarray | list[int]) -> None:
        """Rows of these labels (those the table holds) dead; images left without rows forgotten."""
        labels = np.asarray(labels, dtype=np.int64)
        with self._lock:
            labels = labels[labels < len(self._row_of_label)]
            rows = self._row_of_label[labels]
            rows = rows[rows != NO_ROW]
            rows = rows[self._alive[rows]]
            if len(rows) == 0:
                return
            self._alive[rows] = False
            self._row_of_label[self._labels[rows]] = NO_ROW
            self._dead += len(rows)
            for image_id in np.unique(self._image_ids[rows]):
                start, stop = self._image_rows[image_id]
                if not self._alive[start:stop].any():
                    self._image_rows[image_id] = 0
            if self._dead >= MIN_COMPACT and 2 * self._dead >= self._size:
                self._compact()

    def _compact(self) -> None:
        keep = np.flatnonzero(self._alive[: self._size])
        self._vectors = self._vectors[keep].copy()
        self._labels, self._image_ids = self._labels[keep].copy(), self._image_ids[keep].copy()
        self._boxes, self._scores = self._boxes[keep].copy(), self._scores[keep].copy()
        self._alive = np.ones(len(keep), dtype=bool)
        self._size, self._dead = len(keep), 0
        self._row_of_label[:] = NO_ROW
        self._row_of_label[self._labels] = np.arange(len(keep), dtype=np.int32)
        self._image_rows[:] = 0
        if len(keep):
            self._index_images(0, len(keep))

    def image_ids(self, labels: np.ndarray) -> np.ndarray:
        """The image of each label (shape kept); NO_ROW for labels the table does not hold."""
        labels = np.asarray(labels, dtype=np.int64)
        with self._lock:
            known = (labels >= 0) & (labels < len(self._row_of_label))
            rows = np.where(known, self._row_of_label[np.where(known, labels, 0)], NO_ROW)
            return np.where(rows != NO_ROW, self._image_ids[np.maximum(rows, 0)], NO_ROW)

    def rows(self, labels: np.ndarray) -> dict[int, VectorRow]:
        """The row records of the labels the table holds."""
        labels = np.asarray(labels, dtype=np.int64)
        with self._lock:
            known = labels[(labels >= 0) & (labels < len(self._row_of_label))]
            rows = self._row_of_label[known]
            rows = rows[rows != NO_ROW]
            return {
                int(self._labels[r]): _row(self._labels[r], self._boxes[r], self._scores[r], self._image_ids[r])
                for r in rows.tolist()
            }

    def vectors(self, labels: np.ndarray | list[int]) -> np.ndarray:
        """The vectors of labels the table holds (KeyError for one it does not), float32 (N, dim)."""
        labels = np.asarray(labels, dtype=np.int64)
        with self._lock:
            rows = self._row_of_label[labels[labels < len(self._row_of_label)]]
            if len(rows) != len(labels) or (rows == NO_ROW).any():
                raise KeyError("a label this space does not hold")
            return self._vectors[rows].astype(np.float32)

    def gather(self, image_ids: np.ndarray | list[int]) -> Candidates:
        """The live rows of these images (those without any left out), grouped by image in the order given."""
        ids = np.asarray(image_ids, dtype=np.int64)
        with self._lock:
            ids = ids[(ids >= 0) & (ids < len(self._image_rows))]
            spans = self._image_rows[ids]
            held = spans[:, 1] > spans[:, 0]
            ids, spans = ids[held], spans[held]
            lengths = spans[:, 1] - spans[:, 0]
            rows = np.repeat(spans[:, 0] - np.r_[0, np.cumsum(lengths)[:-1]], lengths) + np.arange(lengths.sum())
            alive = self._alive[rows]
            if not alive.all():  # rows deleted from an image that has others (never by the service's writes)
                rows = rows[alive]
                lengths = np.add.reduceat(alive, np.r_[0, np.cumsum(lengths)[:-1]]) if len(ids) else lengths
            return Candidates(
                ids,
                np.r_[0, np.cumsum(lengths)].astype(np.int64),
                self._vectors[rows].astype(np.float32),
                self._labels[rows],
                self._boxes[rows],
                self._scores[rows],
            )
