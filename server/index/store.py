"""SQLite (WAL) holds everything indexed: images, raw vectors with their boxes, whitenings.

It is the source of truth: the HNSW graphs are caches rebuilt or caught up from it at start, so
an acknowledged write is durable once its transaction commits.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from inserve.server.errors import DuplicateId
from inserve.server.index.codec import decode_vectors, encode_vector
from inserve.server.stages.whitening import Whitening

log = logging.getLogger(__name__)

SCHEMA_VERSION = 6
INCREMENTAL = 2  # PRAGMA auto_vacuum: free pages are kept until PRAGMA incremental_vacuum gives them back
RECLAIM_PAGES = 256  # free pages (1 MiB of 4 KiB pages) that a delete leaves before they are given back

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    external_id TEXT NOT NULL UNIQUE,
    source TEXT NOT NULL DEFAULT '',
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    metadata TEXT NOT NULL DEFAULT '{}',
    thumbnail BLOB,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS spaces (
    recipe TEXT NOT NULL,
    kind TEXT NOT NULL,
    dim INTEGER NOT NULL,
    whitening_version INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (recipe, kind)
);
CREATE TABLE IF NOT EXISTS vectors (
    label INTEGER PRIMARY KEY AUTOINCREMENT,
    image_id INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
    recipe TEXT NOT NULL,
    kind TEXT NOT NULL,
    x1 REAL, y1 REAL, x2 REAL, y2 REAL,
    score REAL NOT NULL DEFAULT 0,
    raw BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS vectors_by_image ON vectors(image_id);
CREATE INDEX IF NOT EXISTS vectors_by_space ON vectors(recipe, kind, label);
CREATE TABLE IF NOT EXISTS whitenings (
    recipe TEXT NOT NULL,
    kind TEXT NOT NULL,
    version INTEGER NOT NULL,
    dims INTEGER NOT NULL,
    learned_from INTEGER NOT NULL,
    mean BLOB NOT NULL,
    projection BLOB NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (recipe, kind, version)
);
"""

# Statements that bring a database of version N - 1 to version N; SCHEMA above is version 1.
MIGRATIONS: dict[int, list[str]] = {
    2: [  # video keyframes are images with the video they come from, their frame, time and shot
        "ALTER TABLE images ADD COLUMN video_id TEXT",
        "ALTER TABLE images ADD COLUMN frame INTEGER",
        "ALTER TABLE images ADD COLUMN time_s REAL",
        "ALTER TABLE images ADD COLUMN shot INTEGER",
        "CREATE INDEX IF NOT EXISTS images_by_video ON images(video_id, shot) WHERE video_id IS NOT NULL",
    ],
    3: [  # a vector's tag (e.g. the class of a CAM class vector); models learned on other data (codebooks)
        "ALTER TABLE vectors ADD COLUMN tag INTEGER",
        "CREATE INDEX IF NOT EXISTS vectors_by_tag ON vectors(recipe, kind, tag)",
        """CREATE TABLE IF NOT EXISTS learned (
            recipe TEXT NOT NULL,
            name TEXT NOT NULL,
            version INTEGER NOT NULL,
            shape TEXT NOT NULL,
            data BLOB NOT NULL,
            source TEXT NOT NULL,
            created REAL NOT NULL,
            PRIMARY KEY (recipe, name, version)
        )""",
    ],
    4: [],  # raw vectors of compact spaces may be int8 blobs (codec.py), which older versions cannot read
    5: [  # a video's source and metadata, once (its keyframes' own stay empty; older keyframes keep theirs)
        """CREATE TABLE IF NOT EXISTS videos (
            video_id TEXT PRIMARY KEY,
            source TEXT NOT NULL DEFAULT '',
            metadata TEXT NOT NULL DEFAULT '{}'
        )""",
    ],
    6: ["ALTER TABLE videos ADD COLUMN live INTEGER NOT NULL DEFAULT 0"],  # keyframes appended as a live stream sends
}

# an image row with, for a keyframe, its video's source and metadata; WHERE clauses name images' columns `i.`
SELECT_IMAGES = (
    "SELECT i.id, i.external_id, COALESCE(v.source, i.source), i.width, i.height, COALESCE(v.metadata, i.metadata),"
    " i.video_id, i.frame, i.time_s, i.shot FROM images i LEFT JOIN videos v ON v.video_id = i.video_id"
)

VIDEO_TAKES_ID = "a video is indexed under this id"
IMAGE_TAKES_ID = "an image is indexed under this id"
FILE_TAKES_ID = "a video file is indexed under this id (a live stream may only continue a live stream)"
LIVE_HOLDS_ID = "a live stream is indexed under this id (index the file under another id, or delete the stream)"


@dataclass(frozen=True)
class LiveResume:
    """Where a live stream continues: its keyframes so far and the last one's time and shot."""

    keyframes: int
    last_time_s: float
    last_shot: int


@dataclass(frozen=True)
class ImageRow:
    id: int
    external_id: str
    source: str
    width: int
    height: int
    metadata: dict[str, str]
    video_id: str | None = None  # set for video keyframes, with the three below
    frame: int | None = None
    time_s: float | None = None
    shot: int | None = None

    @staticmethod
    def from_row(row: tuple) -> ImageRow:
        """From a row of SELECT_IMAGES."""
        return ImageRow(row[0], row[1], row[2], row[3], row[4], json.loads(row[5]), *row[6:10])


@dataclass(frozen=True)
class VectorRow:
    label: int
    image_id: int
    box: tuple[float, float, float, float] | None
    score: float


@dataclass(frozen=True)
class StoredVectors:
    """Rows of one space as SQLite holds them, in label order: what a space in memory is built from."""

    labels: np.ndarray  # (N,) int64
    image_ids: np.ndarray  # (N,) int64
    raw: np.ndarray  # (N, D) float32
    boxes: np.ndarray | None = None  # (N, 4) float32, NaN where a vector has none; None: no vector has one
    scores: np.ndarray | None = None  # (N,) float32

    def __len__(self) -> int:
        return len(self.labels)

    def after(self, label: int) -> StoredVectors:
        """The rows with labels above `label`."""
        keep = self.labels > label
        boxes = None if self.boxes is None else self.boxes[keep]
        scores = None if self.scores is None else self.scores[keep]
        return StoredVectors(self.labels[keep], self.image_ids[keep], self.raw[keep], boxes, scores)


@dataclass(frozen=True)
class Written:
    """What one image's commit wrote: its row id and its new labels per (recipe, kind)."""

    image_id: int
    labels: dict[tuple[str, str], np.ndarray]

    def of(self, v: NewVectors) -> StoredVectors:
        """The rows `v` became, as a space in memory takes them."""
        labels = self.labels[(v.recipe, v.kind)]
        return StoredVectors(labels, np.full(len(labels), self.image_id, np.int64), v.raw, v.boxes, v.scores)


@dataclass(frozen=True)
class NewVectors:
    """Vectors of one (recipe, kind) for one image; boxes (N, 4) in original pixels or None."""

    recipe: str
    kind: str
    raw: np.ndarray  # (N, D) float32
    boxes: np.ndarray | None = None
    scores: np.ndarray | None = None
    tags: np.ndarray | None = None  # (N,) ints with a recipe's meaning, e.g. the class of a CAM class vector


def _unpack(rows: list[tuple[int, int, bytes]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not rows:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros((0, 0), dtype=np.float32)
    labels = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
    image_ids = np.fromiter((r[1] for r in rows), dtype=np.int64, count=len(rows))
    return labels, image_ids, decode_vectors([r[2] for r in rows])


@dataclass(frozen=True)
class NewKeyframe:
    """One keyframe of a video to index: an image with its frame number, time and shot."""

    external_id: str
    frame: int
    time_s: float
    shot: int
    width: int
    height: int
    vectors: list[NewVectors]
    thumbnail: bytes = b""


class MetadataStore:
    """Thread-safe access to the SQLite file; one writer at a time, readers in parallel (WAL)."""

    def __init__(self, path: Path, int8_spaces: Iterable[tuple[str, str]] = ()) -> None:
        self.path = path
        self.int8_spaces = frozenset(int8_spaces)  # (recipe, kind) whose raw vectors are stored as int8
        path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._write_lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        if self._db().execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchone() is None:  # a new file
            self._db().execute(f"PRAGMA auto_vacuum = {INCREMENTAL}")
        with self._transaction() as db:
            for statement in filter(str.strip, SCHEMA.split(";")):
                db.execute(statement)
            found = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            version = 1 if found is None else int(found[0])
            if version > SCHEMA_VERSION:
                raise RuntimeError(f"{path} has schema version {version}, this inserve reads up to {SCHEMA_VERSION}")
            for step in range(version + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[step]:
                    db.execute(statement)
            db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        if self._db().execute("PRAGMA auto_vacuum").fetchone()[0] != INCREMENTAL:
            log.info("%s: rewriting it once so that deleted data gives its space back (VACUUM)", path)
            with self._write_lock:
                self._db().execute(f"PRAGMA auto_vacuum = {INCREMENTAL}")  # an index from before: VACUUM applies it
                self._db().execute("VACUUM")

    def _reclaim(self) -> None:
        """Give the pages of deleted rows back to the file system once there are enough of them (deleting a
        video with large keyframes, replacing many images): without it the file never shrinks."""
        with self._write_lock:
            db = self._db()
            if db.execute("PRAGMA freelist_count").fetchone()[0] >= RECLAIM_PAGES:
                db.executescript("PRAGMA incremental_vacuum;")  # execute() would free one page per call

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = FULL")
            db.execute("PRAGMA foreign_keys = ON")
            self._local.db = db
            with self._connections_lock:
                self._connections.append(db)
        return db

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._write_lock:
            db = self._db()
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def get_meta(self, key: str) -> str | None:
        row = self._db().execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def set_meta(self, key: str, value: str) -> None:
        with self._transaction() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def add_image(
        self,
        external_id: str,
        source: str,
        width: int,
        height: int,
        metadata: dict[str, str],
        vectors: Iterable[NewVectors],
        replace: bool = False,
        thumbnail: bytes = b"",
    ) -> tuple[Written, list[int]]:
        """Insert an image and its vectors in one transaction.

        Returns what was written (the image's row id, the new labels per (recipe, kind)) and the labels the
        replaced image had (empty unless `replace`).
        """
        with self._transaction() as db:
            if self._is_video(db, external_id):
                raise DuplicateId(external_id, VIDEO_TAKES_ID)
            old = db.execute("SELECT id, video_id FROM images WHERE external_id = ?", (external_id,)).fetchone()
            removed: list[int] = []
            if old is not None:
                if old[1] is not None:
                    raise DuplicateId(
                        external_id, f"a keyframe of video {old[1]!r}; index the video again to replace it"
                    )
                if not replace:
                    raise DuplicateId(external_id)
                removed = [r[0] for r in db.execute("SELECT label FROM vectors WHERE image_id = ?", (old[0],))]
                db.execute("DELETE FROM images WHERE id = ?", (old[0],))
            written = self._insert_image(
                db, external_id, source, width, height, metadata, vectors, thumbnail, (None, None, None, None)
            )
        if removed:
            self._reclaim()
        return written, removed

    def replace_video(
        self, video_id: str, source: str, metadata: dict[str, str], keyframes: list[NewKeyframe]
    ) -> tuple[list[Written], list[int], int]:
        """Replace every keyframe of a video in one transaction: until it commits, readers see the old ones.

        Returns what each keyframe's commit wrote, the labels of the keyframes removed and how many keyframes
        were removed.
        Raises DuplicateId when a keyframe's external id belongs to an image of something else.
        """
        with self._transaction() as db:
            if self._is_image(db, video_id):
                raise DuplicateId(video_id, IMAGE_TAKES_ID)
            removed = [
                r[0]
                for r in db.execute(
                    "SELECT v.label FROM vectors v JOIN images i ON i.id = v.image_id WHERE i.video_id = ?",
                    (video_id,),
                )
            ]
            replaced = db.execute("DELETE FROM images WHERE video_id = ?", (video_id,)).rowcount
            db.execute(
                "INSERT OR REPLACE INTO videos (video_id, source, metadata) VALUES (?, ?, ?)",
                (video_id, source, json.dumps(metadata, sort_keys=True)),
            )
            labels = []
            for kf in keyframes:
                if self._id_taken(db, kf.external_id):
                    raise DuplicateId(kf.external_id)
                labels.append(self._insert_keyframe(db, video_id, kf))
        self._reclaim()
        return labels, removed, replaced

    def append_keyframes(
        self, video_id: str, source: str, metadata: dict[str, str], keyframes: list[NewKeyframe], live: bool
    ) -> list[tuple[NewKeyframe, Written]]:
        """Add keyframes to a video in one transaction, a live stream's (`live`) or a file's being indexed for
        the first time; the first commit records its source and metadata. A keyframe whose id is stored already
        is skipped (a stream resent after a break), so appending is idempotent. Returns the keyframes added with
        what their commits wrote. Raises DuplicateId when an image, or a video of the other kind, holds
        `video_id`."""
        with self._transaction() as db:
            self._check_appendable(db, video_id, live)
            db.execute(
                "INSERT OR IGNORE INTO videos (video_id, source, metadata, live) VALUES (?, ?, ?, ?)",
                (video_id, source, json.dumps(metadata, sort_keys=True), int(live)),
            )
            added = []
            for kf in keyframes:
                if self._id_taken(db, kf.external_id):
                    continue
                added.append((kf, self._insert_keyframe(db, video_id, kf)))
        return added

    def live_resume(self, video_id: str) -> LiveResume | None:
        """Where the live stream `video_id` continues (None: it holds no keyframe yet). Raises DuplicateId when
        an image or a video file holds the id."""
        db = self._db()
        self._check_appendable(db, video_id, live=True)
        count, time_s, shot = db.execute(
            "SELECT COUNT(*), MAX(time_s), (SELECT shot FROM images WHERE video_id = ?1 ORDER BY time_s DESC LIMIT 1)"
            " FROM images WHERE video_id = ?1",
            (video_id,),
        ).fetchone()
        return None if count == 0 else LiveResume(int(count), float(time_s), int(shot))

    def _check_appendable(self, db: sqlite3.Connection, video_id: str, live: bool) -> None:
        if self._is_image(db, video_id):
            raise DuplicateId(video_id, IMAGE_TAKES_ID)
        if self._is_video(db, video_id):
            row = db.execute("SELECT live FROM videos WHERE video_id = ?", (video_id,)).fetchone()
            if bool(row and row[0]) != live:
                raise DuplicateId(video_id, FILE_TAKES_ID if live else LIVE_HOLDS_ID)

    def _insert_keyframe(self, db: sqlite3.Connection, video_id: str, kf: NewKeyframe) -> Written:
        """Insert one keyframe inside the caller's transaction; its source and metadata are its video's (`videos`)."""
        return self._insert_image(
            db,
            kf.external_id,
            "",
            kf.width,
            kf.height,
            {},
            kf.vectors,
            kf.thumbnail,
            (video_id, kf.frame, kf.time_s, kf.shot),
        )

    def _insert_image(
        self,
        db: sqlite3.Connection,
        external_id: str,
        source: str,
        width: int,
        height: int,
        metadata: dict[str, str],
        vectors: Iterable[NewVectors],
        thumbnail: bytes,
        video: tuple[str | None, int | None, float | None, int | None],
    ) -> Written:
        """Insert one image row and its vectors inside the caller's transaction."""
        cursor = db.execute(
            "INSERT INTO images (external_id, source, width, height, metadata, thumbnail, created,"
            " video_id, frame, time_s, shot) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                external_id,
                source,
                width,
                height,
                json.dumps(metadata, sort_keys=True),
                thumbnail or None,
                time.time(),
                *video,
            ),
        )
        image_id = int(cursor.lastrowid)
        labels: dict[tuple[str, str], np.ndarray] = {}
        for v in vectors:
            raw = np.ascontiguousarray(v.raw, dtype=np.float32).reshape(len(v.raw), -1)
            self._ensure_space(db, v.recipe, v.kind, raw.shape[1])
            int8 = (v.recipe, v.kind) in self.int8_spaces
            new = []
            for i, row in enumerate(raw):
                box = (None,) * 4 if v.boxes is None else tuple(float(c) for c in v.boxes[i])
                score = 0.0 if v.scores is None else float(v.scores[i])
                tag = None if v.tags is None else int(v.tags[i])
                cursor = db.execute(
                    "INSERT INTO vectors (image_id, recipe, kind, x1, y1, x2, y2, score, raw, tag)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (image_id, v.recipe, v.kind, *box, score, encode_vector(row, int8), tag),
                )
                new.append(cursor.lastrowid)
            labels[(v.recipe, v.kind)] = np.asarray(new, dtype=np.int64)
        return Written(image_id, labels)

    def ensure_space(self, recipe: str, kind: str, dim: int) -> None:
        """Record a space that holds no vectors of its own (an aggregate), so that its whitening can be saved."""
        with self._transaction() as db:
            db.execute(
                "INSERT INTO spaces (recipe, kind, dim) VALUES (?, ?, ?)"
                " ON CONFLICT(recipe, kind) DO UPDATE SET dim = excluded.dim",
                (recipe, kind, dim),
            )

    @staticmethod
    def _ensure_space(db: sqlite3.Connection, recipe: str, kind: str, dim: int) -> None:
        row = db.execute("SELECT dim FROM spaces WHERE recipe = ? AND kind = ?", (recipe, kind)).fetchone()
        if row is None:
            db.execute("INSERT INTO spaces (recipe, kind, dim) VALUES (?, ?, ?)", (recipe, kind, dim))
        elif row[0] != dim:
            raise ValueError(f"{recipe}/{kind} vectors have {row[0]} dimensions in this index, got {dim}")

    def delete_images(self, external_ids: list[str]) -> tuple[list[int], list[str]]:
        """Delete images (or, for a video id, all its keyframes) and their vectors; returns the labels
        removed and the ids not found."""
        labels: list[int] = []
        missing: list[str] = []
        with self._transaction() as db:
            for external_id in external_ids:
                rows = db.execute("SELECT id, video_id FROM images WHERE external_id = ?", (external_id,)).fetchall()
                rows = (
                    rows or db.execute("SELECT id, video_id FROM images WHERE video_id = ?", (external_id,)).fetchall()
                )
                if not rows:
                    missing.append(external_id)
                    continue
                for image_id, video_id in rows:
                    labels += [r[0] for r in db.execute("SELECT label FROM vectors WHERE image_id = ?", (image_id,))]
                    db.execute("DELETE FROM images WHERE id = ?", (image_id,))
                    if video_id is not None and not self._is_video(db, video_id):
                        db.execute("DELETE FROM videos WHERE video_id = ?", (video_id,))
        self._reclaim()
        return labels, missing

    def has_image(self, external_id: str) -> bool:
        """True when an image or keyframe has this id."""
        return self._id_taken(self._db(), external_id)

    @staticmethod
    def _id_taken(db: sqlite3.Connection, external_id: str) -> bool:
        return db.execute("SELECT 1 FROM images WHERE external_id = ?", (external_id,)).fetchone() is not None

    def id_holder(self, external_id: str) -> str | None:
        """What holds an id in the shared namespace of images and videos: "image", "video" or None."""
        db = self._db()
        return "image" if self._is_image(db, external_id) else "video" if self._is_video(db, external_id) else None

    @staticmethod
    def _is_image(db: sqlite3.Connection, external_id: str) -> bool:
        found = db.execute("SELECT 1 FROM images WHERE external_id = ? AND video_id IS NULL", (external_id,))
        return found.fetchone() is not None

    @staticmethod
    def _is_video(db: sqlite3.Connection, video_id: str) -> bool:
        return db.execute("SELECT 1 FROM images WHERE video_id = ? LIMIT 1", (video_id,)).fetchone() is not None

    def spaces(self) -> list[tuple[str, str, int, int]]:
        """(recipe, kind, raw dim, whitening version) of every vector space."""
        return [tuple(r) for r in self._db().execute("SELECT recipe, kind, dim, whitening_version FROM spaces")]

    def vectors(self, recipe: str, kind: str, after_label: int = 0) -> StoredVectors:
        """A space's rows with label > after_label, in label order."""
        rows = (
            self._db()
            .execute(
                "SELECT label, image_id, x1, y1, x2, y2, score, raw FROM vectors"
                " WHERE recipe = ? AND kind = ? AND label > ? ORDER BY label",
                (recipe, kind, after_label),
            )
            .fetchall()
        )
        if not rows:
            empty = np.zeros(0, dtype=np.int64)
            return StoredVectors(empty, empty, np.zeros((0, 0), dtype=np.float32))
        columns = np.array([r[:7] for r in rows], dtype=np.float64)  # NULL corners become NaN
        return StoredVectors(
            columns[:, 0].astype(np.int64),
            columns[:, 1].astype(np.int64),
            decode_vectors([r[7] for r in rows]),
            columns[:, 2:6].astype(np.float32),
            columns[:, 6].astype(np.float32),
        )

    def labels(self, recipe: str, kind: str) -> np.ndarray:
        rows = self._db().execute("SELECT label FROM vectors WHERE recipe = ? AND kind = ?", (recipe, kind))
        return np.fromiter((r[0] for r in rows), dtype=np.int64)

    def space_vectors(self, recipe: str, kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Labels (N,), image ids (N,) and raw vectors (N, D) of a space in label order (= each image's
        vectors in the order its recipe produced them)."""
        rows = (
            self._db()
            .execute(
                "SELECT label, image_id, raw FROM vectors WHERE recipe = ? AND kind = ? ORDER BY label",
                (recipe, kind),
            )
            .fetchall()
        )
        return _unpack(rows)

    def tagged_vectors(
        self, recipe: str, kind: str, tags: Iterable[int]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Labels, image ids, tags and raw vectors of a space's vectors whose tag is one of `tags`, label order."""
        tags = [int(t) for t in tags]
        marks = ",".join("?" * len(tags))
        rows = (
            self._db()
            .execute(
                f"SELECT label, image_id, tag, raw FROM vectors WHERE recipe = ? AND kind = ? AND tag IN ({marks})"
                " ORDER BY label",
                (recipe, kind, *tags),
            )
            .fetchall()
        )
        if not rows:
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty, empty, np.zeros((0, 0), dtype=np.float32)
        labels, image_ids, found = (
            np.fromiter((r[i] for r in rows), dtype=np.int64, count=len(rows)) for i in range(3)
        )
        return labels, image_ids, found, decode_vectors([r[3] for r in rows])

    def space_bytes(self, recipe: str) -> int:
        """Bytes of raw vectors a recipe keeps in SQLite."""
        row = self._db().execute("SELECT COALESCE(SUM(LENGTH(raw)), 0) FROM vectors WHERE recipe = ?", (recipe,))
        return int(row.fetchone()[0])

    def save_learned(self, recipe: str, name: str, data: np.ndarray, source: str) -> int:
        """Store a model learned for a recipe (e.g. its VLAD codebook) as a new version; returns the version."""
        data = np.ascontiguousarray(data, dtype=np.float32)
        with self._transaction() as db:
            version = _next_version(db, "learned", "name", recipe, name)
            db.execute(
                "INSERT INTO learned VALUES (?, ?, ?, ?, ?, ?, ?)",
                (recipe, name, version, json.dumps(list(data.shape)), data.tobytes(), source, time.time()),
            )
        return version

    def learned(self, recipe: str, name: str) -> tuple[int, np.ndarray, str] | None:
        """The newest version of a learned model: (version, data, source), or None."""
        row = (
            self._db()
            .execute(
                "SELECT version, shape, data, source FROM learned WHERE recipe = ? AND name = ?"
                " ORDER BY version DESC LIMIT 1",
                (recipe, name),
            )
            .fetchone()
        )
        if row is None:
            return None
        return int(row[0]), np.frombuffer(row[2], dtype=np.float32).reshape(json.loads(row[1])), row[3]

    def image_rows(self, image_ids: Iterable[int]) -> dict[int, ImageRow]:
        ids = [int(v) for v in image_ids]
        found: dict[int, ImageRow] = {}
        for start in range(0, len(ids), 900):
            chunk = ids[start : start + 900]
            marks = ",".join("?" * len(chunk))
            for row in self._db().execute(f"{SELECT_IMAGES} WHERE i.id IN ({marks})", chunk):
                found[row[0]] = ImageRow.from_row(row)
        return found

    def thumbnails(self, image_ids: Iterable[int]) -> dict[int, bytes]:
        ids = [int(v) for v in image_ids]
        found: dict[int, bytes] = {}
        for start in range(0, len(ids), 900):
            chunk = ids[start : start + 900]
            marks = ",".join("?" * len(chunk))
            for image_id, thumbnail in self._db().execute(
                f"SELECT id, thumbnail FROM images WHERE id IN ({marks}) AND thumbnail IS NOT NULL", chunk
            ):
                found[image_id] = thumbnail
        return found

    def image_by_external_id(self, external_id: str) -> ImageRow | None:
        row = self._db().execute(f"{SELECT_IMAGES} WHERE i.external_id = ?", (external_id,)).fetchone()
        return None if row is None else ImageRow.from_row(row)

    def keyframes(self, video_id: str) -> list[ImageRow]:
        """A video's keyframes in time order."""
        rows = self._db().execute(f"{SELECT_IMAGES} WHERE i.video_id = ? ORDER BY i.time_s, i.frame", (video_id,))
        return [ImageRow.from_row(row) for row in rows]

    def count_videos(self) -> tuple[int, int]:
        """Videos and keyframes indexed."""
        row = self._db().execute("SELECT COUNT(DISTINCT video_id), COUNT(video_id) FROM images").fetchone()
        return int(row[0]), int(row[1])

    def count_images(self) -> int:
        return int(self._db().execute("SELECT COUNT(*) FROM images").fetchone()[0])

    def count_vectors(self, recipe: str | None = None, kind: str | None = None) -> int:
        sql, args = "SELECT COUNT(*) FROM vectors WHERE 1 = 1", []
        if recipe is not None:
            sql, args = sql + " AND recipe = ?", [*args, recipe]
        if kind is not None:
            sql, args = sql + " AND kind = ?", [*args, kind]
        return int(self._db().execute(sql, args).fetchone()[0])

    def save_whitening(self, recipe: str, kind: str, whitening: Whitening, learned_from: int) -> int:
        with self._transaction() as db:
            version = _next_version(db, "whitenings", "kind", recipe, kind)
            db.execute(
                "INSERT INTO whitenings VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    recipe,
                    kind,
                    version,
                    whitening.dims,
                    learned_from,
                    whitening.mean.astype(np.float32).tobytes(),
                    whitening.projection.astype(np.float32).tobytes(),
                    time.time(),
                ),
            )
            db.execute("UPDATE spaces SET whitening_version = ? WHERE recipe = ? AND kind = ?", (version, recipe, kind))
        return version

    def whitening(self, recipe: str, kind: str) -> tuple[int, Whitening | None]:
        """The space's current whitening version and whitening (0, None when not whitened)."""
        row = self._current_whitening("w.version, w.dims, w.mean, w.projection", recipe, kind)
        if row is None:
            return 0, None
        mean = np.frombuffer(row[2], dtype=np.float32)
        projection = np.frombuffer(row[3], dtype=np.float32).reshape(row[1], len(mean))
        return int(row[0]), Whitening(mean, projection)

    def learned_from(self, recipe: str, kind: str) -> int:
        """How many vectors the space's current whitening (or reduction) was learned from; 0 when none."""
        row = self._current_whitening("w.learned_from", recipe, kind)
        return 0 if row is None else int(row[0])

    def _current_whitening(self, columns: str, recipe: str, kind: str) -> tuple | None:
        """Columns (of `whitenings w`) of the whitening a space uses now; None when it uses none."""
        return (
            self._db()
            .execute(
                f"SELECT {columns} FROM spaces s JOIN whitenings w"
                " ON w.recipe = s.recipe AND w.kind = s.kind AND w.version = s.whitening_version"
                " WHERE s.recipe = ? AND s.kind = ?",
                (recipe, kind),
            )
            .fetchone()
        )

    def close(self) -> None:
        """Close every thread's connection (after the last use from any thread)."""
        with self._connections_lock:
            for db in self._connections:
                db.close()
            self._connections.clear()
        self._local = threading.local()


def _next_version(db: sqlite3.Connection, table: str, name_column: str, recipe: str, name: str) -> int:
    """The version a new row of a versioned table (whitenings per space, learned models per name) takes."""
    row = db.execute(
        f"SELECT COALESCE(MAX(version), 0) FROM {table} WHERE recipe = ? AND {name_column} = ?", (recipe, name)
    ).fetchone()
    return int(row[0]) + 1
