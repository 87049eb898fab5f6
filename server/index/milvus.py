"""Milvus as the index's store, shared by several replicas: everything indexed and everything learned from it
lives in Milvus collections, so a replica holds no state of its own and any replica finds what another
acknowledged.

Collections (names start with the store's prefix, `inserve` by default):
- `<p>_meta`: the layout version, one record per vector space (its dims, transform version and collection),
  learned models and whitenings as chunked blobs.
- `<p>_images`: one row per image or keyframe (id, external id, size, metadata, thumbnail, video fields).
- `<p>_videos`: one row per video (source, metadata, live).
- one collection per vector space and transform version, `<p>_s_<recipe>_<kind>_<version>[_<suffix>]`: a row per
  vector with its image id, box, score, tag, raw vector (codec.py bytes, base64) and the vector in the space's
  coordinates under an HNSW index (IndexConfig: M, efConstruction, ef). Learning a transform writes a new
  collection beside the one in use, switches the space record to it, catches up with what was written to the
  old one meanwhile and drops the old one; one replica at a time learns for a recipe (a lease in `<p>_meta`).

Writes go vectors first, then the image row: a vector whose image row is not there (a write cut short, a
delete under way) is never returned. Every read uses `Strong` consistency, so a read after an acknowledged write
sees it, from any replica (Milvus waits until the read's timestamp is applied everywhere: tens of ms on a
cluster, nothing on milvus-lite); ids come from `SnowflakeIds`. Milvus has no transactions across collections:
two replicas writing one external id at the same moment can both succeed (the later row wins on reads), which
the single-writer SQLite store refuses. A per-image aggregate (R-MAC, CAM, VLAD recipes) is a space of its own,
written with its image's parts and rebuilt into a new collection when the parts' transform or the recipe's
learned models change.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from pymilvus import DataType, MilvusClient
from pymilvus.exceptions import MilvusException, MilvusUnavailableException

from inserve.server.config import IndexConfig
from inserve.server.errors import ConfigError, DuplicateId, LiveStreamBusy, StoreUnavailable
from inserve.server.index.codec import decode_vectors, encode_vector
from inserve.server.index.scoring_table import NO_ROW, Candidates
from inserve.server.index.space_rules import SpaceRules
from inserve.server.index.spaces import (
    NOT_SEARCHED,
    SpaceSpec,
    SpaceStats,
)
from inserve.server.index.store import (
    FILE_TAKES_ID,
    IMAGE_TAKES_ID,
    LIVE_HOLDS_ID,
    VIDEO_TAKES_ID,
    ImageRow,
    LiveResume,
    NewKeyframe,
    NewVectors,
    VectorRow,
)
from inserve.server.index.transforms import compact, learn_transform, training_vectors
from inserve.server.stages.whitening import Whitening, space_transform

log = logging.getLogger(__name__)

STORE_FORMAT = 1  # the collections' layout; a store written by another is refused
CONSISTENCY = "Strong"
TEXT = 65535  # VARCHAR bytes, Milvus' largest
BLOB_CHUNK = 48 << 10  # base64 characters per meta row
THUMBNAIL_CHUNKS = 4  # a thumbnail's base64 in at most this many VARCHARs
PLACEHOLDER = [0.0, 0.0]  # the vector of collections that search none (Milvus collections need one)
NO_TAG = -1  # tags are class indices, >= 0
# a space row but its vector in the space's coordinates
ROW_FIELDS = ("label", "image_id", "box", "score", "tag", "raw")
PAGE = 4096
LEASE_S = 3600.0  # a replica's lease on learning for a recipe, if it dies holding it
LIVE_LEASE_S = 30.0  # a replica's claim on a live stream id, renewed while it holds it: a dead one's expires
LEASE_SETTLE_S = 0.5  # how long a replica waits after writing its lease before it reads whose it is
NOT_LOADED = 101  # MilvusException codes: a collection not loaded (released by a restart)
UNREACHABLE = (2, 503)  # MilvusException codes: no connection, unavailable  # rows per query page
EPOCH_MS = 1_767_225_600_000  # 2026-01-01: 41 bits of milliseconds from it last until 2095


class SnowflakeIds:
    """Image ids and labels unique across replicas without a shared counter: milliseconds since EPOCH_MS (41
    bits), a random node number drawn per process (10 bits), a sequence within the millisecond (12 bits).
    Increasing within a process, as SQLite's AUTOINCREMENT; two processes collide only if they drew the same
    node number and write in the same millisecond."""

    def __init__(self) -> None:
        self.node = secrets.randbits(10)
        self._lock = threading.Lock()
        self._last_ms = 0
        self._sequence = 0

    def take(self, count: int) -> list[int]:
        ids = []
        with self._lock:
            while len(ids) < count:
                now = int(time.time() * 1000) - EPOCH_MS
                if now > self._last_ms:
                    self._last_ms, self._sequence = now, 0
                elif self._sequence >= 4095:
                    time.sleep(0.001)
                    continue
                else:
                    self._sequence += 1
                ids.append((self._last_ms << 22) | (self.node << 12) | self._sequence)
        return ids


@dataclass(frozen=True)
class SpaceRecord:
    """A vector space as the meta collection records it."""

    raw_dim: int
    dim: int
    version: int
    learned_from: int
    collection: str


class MilvusSpace:
    """What the rest of the server reads of a space (the Space protocol): its dims, transform version and size
    (counted when asked), and its transform."""

    def __init__(
        self, record: SpaceRecord, whitening: Whitening | None, searchable: bool, count: Callable[[], int]
    ) -> None:
        self.raw_dim, self.dim, self.version = record.raw_dim, record.dim, record.version
        self.whitening = whitening
        self.searchable = searchable
        self._count = count

    def __len__(self) -> int:
        return self._count()

    def transform(self, raw: np.ndarray) -> np.ndarray:
        return space_transform(self.whitening, raw)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"))


def _quote(text: str) -> str:
    """A string literal for a Milvus filter expression."""
    return json.dumps(text)


def _ids(values) -> str:
    return "[" + ",".join(str(int(v)) for v in values) + "]"


class MilvusIndex(SpaceRules):
    """The Index protocol (server/index/protocol.py) over Milvus (see the module docstring); `uri` as pymilvus
    takes it."""

    def __init__(
        self,
        uri: str,
        config: IndexConfig = IndexConfig(),
        specs: Mapping[tuple[str, str], SpaceSpec] | None = None,
        prefix: str = "inserve",
    ) -> None:
        self.config = config
        self.specs = dict(specs or {})
        self.uri = uri
        self._p = prefix
        self._ids = SnowflakeIds()
        self._whitenings: dict[tuple[str, str, int], Whitening | None] = {}
        self._learning = threading.Lock()
        self._local = not uri.startswith("http")  # a milvus-lite file, served by a thread of this process
        self._searching = threading.local()  # a search's space records (reading())
        try:
            self._client = MilvusClient(uri=uri, timeout=30)
        except Exception as exc:  # pymilvus raises its own types, and OSError for a milvus-lite file
            shared = (
                f" (a milvus-lite file opens in one process only: serve it to many with `milvus-lite server "
                f"--data-dir {uri} --port P` and give --store milvus://HOST:P)"
                if self._local
                else ""
            )
            raise ConfigError(f"cannot reach the Milvus store {uri}{shared}: {exc}") from exc
        self._call(self._open)

    # --- the layout ---

    def _call(self, fn, *args, **kwargs):
        """Run one store operation. A store that cannot be reached is StoreUnavailable (callers get UNAVAILABLE
        and may retry; the replica goes on serving). A Milvus that restarted has its collections released:
        they are loaded again and the operation retried once."""
        try:
            try:
                return fn(*args, **kwargs)
            except MilvusException as exc:
                if exc.code != NOT_LOADED:
                    raise
                self._load_collections()
                return fn(*args, **kwargs)
        except MilvusUnavailableException as exc:
            raise StoreUnavailable(f"the Milvus store {self.uri} is unavailable: {exc.message}") from exc
        except MilvusException as exc:
            if exc.code in UNREACHABLE:
                raise StoreUnavailable(f"the Milvus store {self.uri} is unavailable: {exc.message}") from exc
            raise

    def _load_collections(self) -> None:
        for name in self._client.list_collections():
            if name.startswith(f"{self._p}_"):
                self._client.load_collection(name)

    def _open(self) -> None:
        self._ensure(
            f"{self._p}_meta",
            [
                ("key", DataType.VARCHAR, {"max_length": 1024, "is_primary": True}),
                ("value", DataType.VARCHAR, {"max_length": TEXT}),
            ],
        )
        found = self._get_meta("format")
        if found is None:
            self._put_meta("format", json.dumps(STORE_FORMAT))
        elif json.loads(found) != STORE_FORMAT:
            raise ConfigError(
                f"the Milvus store {self.uri} ({self._p}_*) was written by inserve store format {found}; "
                f"this inserve reads format {STORE_FORMAT}"
            )
        self._ensure(
            f"{self._p}_images",
            [
                ("id", DataType.INT64, {"is_primary": True}),
                ("external_id", DataType.VARCHAR, {"max_length": 4096}),
                ("source", DataType.VARCHAR, {"max_length": TEXT}),
                ("width", DataType.INT64, {}),
                ("height", DataType.INT64, {}),
                ("metadata", DataType.JSON, {}),
                (
                    "thumbnail",
                    DataType.ARRAY,
                    {"element_type": DataType.VARCHAR, "max_capacity": THUMBNAIL_CHUNKS, "max_length": TEXT},
                ),
                ("video_id", DataType.VARCHAR, {"max_length": 4096}),  # "" for an image
                ("frame", DataType.INT64, {}),
                ("time_s", DataType.DOUBLE, {}),
                ("shot", DataType.INT64, {}),
            ],
        )
        self._ensure(
            f"{self._p}_videos",
            [
                ("video_id", DataType.VARCHAR, {"max_length": 4096, "is_primary": True}),
                ("source", DataType.VARCHAR, {"max_length": TEXT}),
                ("metadata", DataType.JSON, {}),
                ("live", DataType.BOOL, {}),
            ],
        )
        for (recipe, kind), record in self._records().items():
            if not self._client.has_collection(record.collection):
                raise ConfigError(f"the Milvus store lacks {record.collection}, which holds {recipe}/{kind}")
            dim = self._vector_dim(record.collection)
            if dim != record.dim:
                raise ConfigError(
                    f"{record.collection} ({recipe}/{kind}) holds {dim}-dimensional vectors; its record in "
                    f"{self._p}_meta says {record.dim}: it was made by another inserve or changed by hand"
                )

    def _ensure(self, name: str, fields: list, vector_index: dict | None = None) -> None:
        """Create a collection unless it exists (a replica starting beside others may lose that race: fine).
        Without `vector_index` (for field `vec`) it gets a 2-d placeholder vector `v`: Milvus collections need
        a vector field."""
        if self._client.has_collection(name):
            self._client.load_collection(name)
            return
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        for field_name, dtype, params in fields:
            schema.add_field(field_name, dtype, **params)
        index = self._client.prepare_index_params()
        if vector_index is None:
            schema.add_field("v", DataType.FLOAT_VECTOR, dim=2)
            index.add_index("v", index_type="FLAT", metric_type="L2")
        else:
            index.add_index("vec", **vector_index)
        try:
            self._client.create_collection(name, schema=schema, index_params=index, consistency_level=CONSISTENCY)
        except Exception:
            if not self._client.has_collection(name):
                raise
        self._client.load_collection(name)

    def _vector_dim(self, collection: str) -> int:
        fields = self._client.describe_collection(collection)["fields"]
        return int(next(f for f in fields if f["name"] == "vec")["params"]["dim"])

    def _space_collection(self, recipe: str, kind: str, dim: int, version: int, shared: bool) -> str:
        """A space's collection for a transform version. A new space's (`shared`) has a fixed name, so that
        replicas creating it at once all write to the one collection; one a learner or rebuilder fills is its
        own until it switches the space to it."""
        name = f"{self._p}_s_{recipe}_{kind}_{version}" + ("" if shared else f"_{secrets.token_hex(4)}")
        self._ensure(
            name,
            [
                ("label", DataType.INT64, {"is_primary": True}),
                ("image_id", DataType.INT64, {}),
                ("box", DataType.ARRAY, {"element_type": DataType.FLOAT, "max_capacity": 4}),  # [] = none
                ("score", DataType.FLOAT, {}),
                ("tag", DataType.INT64, {}),
                ("raw", DataType.VARCHAR, {"max_length": TEXT}),
                ("vec", DataType.FLOAT_VECTOR, {"dim": dim}),
            ],
            vector_index={
                "index_type": "HNSW",
                "metric_type": "IP",
                "params": {"M": self.config.hnsw_m, "efConstruction": self.config.ef_construction},
            },
        )
        return name

    # --- meta rows and blobs ---

    def _get_meta(self, key: str) -> str | None:
        rows = self._client.get(f"{self._p}_meta", ids=[key], output_fields=["value"])
        return rows[0]["value"] if rows else None

    def _put_meta(self, key: str, value: str) -> None:
        self._client.upsert(f"{self._p}_meta", [{"key": key, "value": value, "v": PLACEHOLDER}])

    def _put_blob(self, key: str, data: bytes) -> None:
        text = _b64(data)
        chunks = [text[i : i + BLOB_CHUNK] for i in range(0, len(text), BLOB_CHUNK)] or [""]
        rows = [{"key": f"{key}#{i}", "value": chunk, "v": PLACEHOLDER} for i, chunk in enumerate(chunks)]
        for start in range(0, len(rows), 64):
            self._client.upsert(f"{self._p}_meta", rows[start : start + 64])
        self._put_meta(key, json.dumps({"chunks": len(chunks)}))  # last: the blob exists once whole

    def _get_blob(self, key: str) -> bytes | None:
        header = self._get_meta(key)
        if header is None:
            return None
        keys = [f"{key}#{i}" for i in range(json.loads(header)["chunks"])]
        found = {}
        for start in range(0, len(keys), 64):
            for row in self._client.get(f"{self._p}_meta", ids=keys[start : start + 64], output_fields=["value"]):
                found[row["key"]] = row["value"]
        return _unb64("".join(found[k] for k in keys))

    def _records(self) -> dict[tuple[str, str], SpaceRecord]:
        rows = self._few(f"{self._p}_meta", 'key like "space/%"', ["key", "value"])
        records = {}
        for row in rows:
            _, recipe, kind = row["key"].split("/", 2)
            records[(recipe, kind)] = SpaceRecord(**json.loads(row["value"]))
        return records

    def _record(self, recipe: str, kind: str) -> SpaceRecord | None:
        cache = getattr(self._searching, "records", None)
        if cache is not None and (recipe, kind) in cache:
            return cache[(recipe, kind)]
        found = self._get_meta(f"space/{recipe}/{kind}")
        record = None if found is None else SpaceRecord(**json.loads(found))
        if cache is not None:
            cache[(recipe, kind)] = record
        return record

    def _save_record(self, recipe: str, kind: str, record: SpaceRecord) -> None:
        self._put_meta(f"space/{recipe}/{kind}", json.dumps(record.__dict__))

    def _whitening(self, recipe: str, kind: str, version: int) -> Whitening | None:
        key = (recipe, kind, version)
        if key not in self._whitenings:
            data = self._get_blob(f"whitening/{recipe}/{kind}/{version}") if version else None
            if data is None:
                self._whitenings[key] = None
            else:
                arrays = np.load(io.BytesIO(data))
                self._whitenings[key] = Whitening(arrays["mean"], arrays["projection"])
        return self._whitenings[key]

    def _few(self, collection: str, expr: str, fields: list[str]) -> list[dict]:
        """The rows matching `expr` where there can only be a few (one id's image rows, the space records)."""
        return self._client.query(collection, filter=expr, output_fields=fields, limit=PAGE)

    def _query(self, collection: str, expr: str, fields: list[str]) -> list[dict]:
        """Every row matching `expr`, page by page (a query returns at most 16384 rows)."""
        rows: list[dict] = []
        iterator = self._client.query_iterator(collection, batch_size=PAGE, filter=expr, output_fields=fields)
        try:
            while page := iterator.next():
                rows += page
        finally:
            iterator.close()
        return rows

    def _count(self, collection: str, expr: str = "") -> int:
        found = self._client.query(collection, filter=expr, output_fields=["count(*)"])
        return int(found[0]["count(*)"])

    # --- the Index protocol ---

    @contextmanager
    def reading(self) -> Iterator[None]:
        """A search's reads are each consistent (Strong); between two of them another replica's write may land,
        which a search sees as an image whose row it reads without its vectors, or the other way round: both are
        left out of its hits. The space records a search reads are read once for the whole search (one round
        trip each instead of one per step); a transform switched meanwhile shows as a dims mismatch, which
        answers UNAVAILABLE "search again"."""
        if getattr(self._searching, "records", None) is not None:
            yield
            return
        self._searching.records = {}
        try:
            yield
        finally:
            self._searching.records = None

    def space(self, recipe: str, kind: str) -> MilvusSpace | None:
        return self._call(self._space, recipe, kind)

    def _space(self, recipe: str, kind: str, record: SpaceRecord | None = None) -> MilvusSpace | None:
        record = record or self._record(recipe, kind)
        if record is None:
            return None
        whitening = self._whitening(recipe, kind, record.version)
        count = lambda: self._call(self._count, record.collection)  # noqa: E731
        return MilvusSpace(record, whitening, self.spec(recipe, kind).searchable, count)

    def contains(self, external_id: str) -> bool:
        return self._call(self._image_ids, external_id) != []

    def _image_ids(self, external_id: str, keyframes_of: bool = False) -> list[int]:
        if keyframes_of:
            return [r["id"] for r in self._query(f"{self._p}_images", f"video_id == {_quote(external_id)}", ["id"])]
        return [r["id"] for r in self._few(f"{self._p}_images", f"external_id == {_quote(external_id)}", ["id"])]

    def _is_image(self, external_id: str) -> bool:
        expr = f'external_id == {_quote(external_id)} and video_id == ""'
        return self._client.query(f"{self._p}_images", filter=expr, output_fields=["id"], limit=1) != []

    def _is_video(self, video_id: str) -> bool:
        return self._client.get(f"{self._p}_videos", ids=[video_id], output_fields=["video_id"]) != []

    def id_holder(self, external_id: str) -> str | None:
        return self._call(
            lambda: "image" if self._is_image(external_id) else "video" if self._is_video(external_id) else None
        )

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
        return self._call(
            self._add_image, external_id, vectors, width, height, source, metadata or {}, replace, thumbnail
        )

    def _add_image(self, external_id, vectors, width, height, source, metadata, replace, thumbnail) -> int:
        if self._is_video(external_id):
            raise DuplicateId(external_id, VIDEO_TAKES_ID)
        old = self._few(f"{self._p}_images", f"external_id == {_quote(external_id)}", ["id", "video_id"])
        if old:
            if old[0]["video_id"]:
                raise DuplicateId(
                    external_id, f"a keyframe of video {old[0]['video_id']!r}; index the video again to replace it"
                )
            if not replace:
                raise DuplicateId(external_id)
        image_id = self._ids.take(1)[0]
        self._insert_vectors(image_id, vectors)
        self._insert_images([self._image_row(image_id, external_id, source, width, height, metadata, thumbnail)])
        self._remove_images([row["id"] for row in old])
        return image_id

    def _image_row(
        self, image_id, external_id, source, width, height, metadata, thumbnail, video=("", -1, -1.0, -1)
    ) -> dict:
        text = _b64(thumbnail) if thumbnail else ""
        chunks = [text[i : i + TEXT] for i in range(0, len(text), TEXT)][:THUMBNAIL_CHUNKS]
        return {
            "id": image_id,
            "external_id": external_id,
            "source": source,
            "width": int(width),
            "height": int(height),
            "metadata": dict(metadata),
            "thumbnail": chunks if len(chunks) * TEXT >= len(text) else [],  # too large to keep: none
            "video_id": video[0],
            "frame": int(video[1]),
            "time_s": float(video[2]),
            "shot": int(video[3]),
            "v": PLACEHOLDER,
        }

    def _insert_images(self, rows: list[dict]) -> None:
        if rows:
            self._client.insert(f"{self._p}_images", rows)

    def _insert_vectors(self, image_id: int, vectors: list[NewVectors]) -> None:
        """Vectors into their spaces' collections, and each image's aggregates of them."""
        for v in vectors:
            raw = np.ascontiguousarray(v.raw, dtype=np.float32).reshape(len(v.raw), -1)
            if len(raw) == 0:
                continue
            labels = self._ids.take(len(raw))
            rows = [
                {
                    "label": label,
                    "image_id": image_id,
                    "box": [] if v.boxes is None else [float(c) for c in v.boxes[i]],
                    "score": 0.0 if v.scores is None else float(v.scores[i]),
                    "tag": NO_TAG if v.tags is None else int(v.tags[i]),
                }
                for i, label in enumerate(labels)
            ]
            self._write(v.recipe, v.kind, rows, raw)
            for recipe, kind in self._aggregates(v.recipe, v.kind):
                combined = self.combine(recipe, self.spec(recipe, kind).aggregate, raw)
                if combined is not None:
                    row = {"label": min(labels), "image_id": image_id, "box": [], "score": 0.0, "tag": NO_TAG}
                    self._write(recipe, kind, [row], combined[None])

    def _write(self, recipe: str, kind: str, rows: list[dict], raw: np.ndarray) -> None:
        """Rows with their raw vectors into the space's current collection (created with the first); a space
        switched to a new collection meanwhile (a learned transform, a rebuilt aggregate) gets them again in the
        new one, as the switcher catches up from the old one only until it switched."""
        record = self._ensure_space(recipe, kind, raw.shape[1])
        int8 = compact(self.spec(recipe, kind), self.config)
        for row, vector in zip(rows, raw):
            row["raw"] = _b64(encode_vector(vector, int8))
        while True:
            vecs = self._space(recipe, kind, record).transform(raw)
            for row, vec in zip(rows, vecs):
                row["vec"] = vec.tolist()
            try:
                self._client.upsert(record.collection, rows)
            except MilvusException:
                if self._record(recipe, kind).collection == record.collection:
                    raise
            now = self._record(recipe, kind)  # dropped or switched: again, in the new one
            if now.collection == record.collection:
                return
            record = now

    def _ensure_space(self, recipe: str, kind: str, raw_dim: int) -> SpaceRecord:
        record = self._record(recipe, kind)
        if record is None:
            with self._learning:
                record = self._record(recipe, kind)
                if record is None:
                    record = SpaceRecord(
                        raw_dim, raw_dim, 0, 0, self._space_collection(recipe, kind, raw_dim, 0, shared=True)
                    )
                    self._save_record(recipe, kind, record)
        if record.raw_dim != raw_dim:
            raise ValueError(f"{recipe}/{kind} vectors have {record.raw_dim} dimensions in this index, got {raw_dim}")
        return record

    def _remove_images(self, image_ids: list[int]) -> None:
        """Image rows first (their vectors stop being returned at once), then their vectors."""
        if not image_ids:
            return
        self._client.delete(f"{self._p}_images", filter=f"id in {_ids(image_ids)}")
        for record in self._records().values():
            self._client.delete(record.collection, filter=f"image_id in {_ids(image_ids)}")

    def replace_video(
        self, video_id: str, keyframes: list[NewKeyframe], *, source: str = "", metadata: dict[str, str] | None = None
    ) -> int:
        return self._call(self._replace_video, video_id, keyframes, source, metadata or {})

    def _replace_video(self, video_id, keyframes, source, metadata) -> int:
        if self._is_image(video_id):
            raise DuplicateId(video_id, IMAGE_TAKES_ID)
        old = self._image_ids(video_id, keyframes_of=True)
        for kf in keyframes:
            if not set(self._image_ids(kf.external_id)) <= set(old):
                raise DuplicateId(kf.external_id)
        self._put_video(video_id, source, metadata, live=False)
        self._insert_keyframes(video_id, keyframes)
        self._remove_images(old)
        return len(old)

    def _put_video(self, video_id: str, source: str, metadata: dict[str, str], live: bool) -> None:
        row = {"video_id": video_id, "source": source, "metadata": dict(metadata), "live": live, "v": PLACEHOLDER}
        self._client.upsert(f"{self._p}_videos", [row])

    def _insert_keyframes(self, video_id: str, keyframes: list[NewKeyframe]) -> None:
        rows = []
        for kf, image_id in zip(keyframes, self._ids.take(len(keyframes))):
            self._insert_vectors(image_id, kf.vectors)
            video = (video_id, kf.frame, kf.time_s, kf.shot)
            rows.append(self._image_row(image_id, kf.external_id, "", kf.width, kf.height, {}, kf.thumbnail, video))
        self._insert_images(rows)

    def append_keyframes(
        self,
        video_id: str,
        keyframes: list[NewKeyframe],
        *,
        live: bool,
        source: str = "",
        metadata: dict[str, str] | None = None,
    ) -> list[NewKeyframe]:
        return self._call(self._append_keyframes, video_id, keyframes, live, source, metadata or {})

    def _append_keyframes(self, video_id, keyframes, live, source, metadata) -> list[NewKeyframe]:
        self._check_appendable(video_id, live)
        if not self._is_video(video_id):
            self._put_video(video_id, source, metadata, live)
        added = [
            kf for kf in dict((kf.external_id, kf) for kf in keyframes).values() if not self._image_ids(kf.external_id)
        ]
        self._insert_keyframes(video_id, added)
        return added

    def _check_appendable(self, video_id: str, live: bool) -> None:
        if self._is_image(video_id):
            raise DuplicateId(video_id, IMAGE_TAKES_ID)
        found = self._client.get(f"{self._p}_videos", ids=[video_id], output_fields=["live"])
        if found and bool(found[0]["live"]) != live:
            raise DuplicateId(video_id, FILE_TAKES_ID if live else LIVE_HOLDS_ID)

    def live_resume(self, stream_id: str) -> LiveResume | None:
        return self._call(self._live_resume, stream_id)

    def _live_resume(self, stream_id: str) -> LiveResume | None:
        self._check_appendable(stream_id, live=True)
        rows = self._query(f"{self._p}_images", f"video_id == {_quote(stream_id)}", ["time_s", "shot"])
        if not rows:
            return None
        last = max(rows, key=lambda r: r["time_s"])
        return LiveResume(len(rows), float(last["time_s"]), int(last["shot"]))

    def delete(self, external_ids: list[str]) -> tuple[int, list[str]]:
        unique = list(dict.fromkeys(external_ids))
        return self._call(self._delete, unique)

    def _delete(self, unique: list[str]) -> tuple[int, list[str]]:
        missing, doomed = [], []
        for external_id in unique:
            rows = self._few(f"{self._p}_images", f"external_id == {_quote(external_id)}", ["id", "video_id"])
            video = external_id if not rows and self._is_video(external_id) else None
            if video is not None:
                rows = self._query(f"{self._p}_images", f"video_id == {_quote(video)}", ["id", "video_id"])
            if not rows and video is None:
                missing.append(external_id)
                continue
            doomed += [r["id"] for r in rows]
            if video is not None:
                self._client.delete(f"{self._p}_videos", ids=[video])
            for row in rows:
                if row["video_id"] and row["video_id"] != video:
                    others = self._image_ids(row["video_id"], keyframes_of=True)
                    if set(others) <= {r["id"] for r in rows}:
                        self._client.delete(f"{self._p}_videos", ids=[row["video_id"]])
        self._remove_images(doomed)
        return len(unique) - len(missing), missing

    def nearest(self, recipe: str, kind: str, query: np.ndarray, k: int) -> list[tuple[VectorRow, float]]:
        return self.nearest_each(recipe, kind, np.atleast_2d(query), k)[0]

    def nearest_each(self, recipe: str, kind: str, queries: np.ndarray, k: int) -> list[list[tuple[VectorRow, float]]]:
        """One Milvus search for all queries (N, dim), and one read of the images their hits belong to."""
        return self._call(self._nearest_each, recipe, kind, queries, k)

    def _nearest_each(self, recipe: str, kind: str, queries: np.ndarray, k: int) -> list[list[tuple[VectorRow, float]]]:
        record = self._record(recipe, kind)
        if record is None or k <= 0:
            return [[] for _ in queries]
        self._check_searched(recipe, kind)
        queries = np.asarray(queries, dtype=np.float32)
        if queries.shape[1] != record.dim:
            raise StoreUnavailable(f"{recipe}/{kind} switched to another transform during the search: search again")
        found = self._client.search(
            record.collection,
            data=queries.tolist(),
            anns_field="vec",
            limit=k,
            output_fields=["image_id", "box", "score"],
            search_params={"metric_type": "IP", "params": {"ef": max(self.config.ef_search, k)}},
        )
        hits = [
            [(self._vector_row(hit["label"], hit["entity"]), float(hit["distance"])) for hit in each] for each in found
        ]
        live = self._live_images({row.image_id for each in hits for row, _ in each})
        return [[(row, sim) for row, sim in each if row.image_id in live] for each in hits]

    @staticmethod
    def _vector_row(label: int, entity: dict) -> VectorRow:
        box = entity["box"]
        return VectorRow(
            int(label), int(entity["image_id"]), tuple(float(c) for c in box) if box else None, float(entity["score"])
        )

    def _live_images(self, image_ids: set[int]) -> set[int]:
        if not image_ids:
            return set()
        return {r["id"] for r in self._client.get(f"{self._p}_images", ids=sorted(image_ids), output_fields=["id"])}

    def _check_searched(self, recipe: str, kind: str) -> None:
        if not self.spec(recipe, kind).searchable:
            raise ValueError(f"{recipe}/{kind} {NOT_SEARCHED}")

    def stored(self, recipe: str, kind: str, labels: list[int]) -> np.ndarray:
        self._check_searched(recipe, kind)

        def read() -> np.ndarray:
            record = self._record(recipe, kind)
            rows = {
                r["label"]: r["vec"]
                for r in self._client.get(record.collection, ids=[int(v) for v in labels], output_fields=["vec"])
            }
            return np.asarray([rows[int(v)] for v in labels], dtype=np.float32).reshape(-1, record.dim)

        return self._call(read)

    def image_vectors(
        self, recipe: str, kind: str, image_ids: list[int]
    ) -> dict[int, tuple[list[VectorRow], np.ndarray]]:
        return self._call(self._image_vectors, recipe, kind, image_ids)

    def candidates(self, recipe: str, kind: str, image_ids: list[int] | np.ndarray) -> Candidates:
        """The images' rows, grouped, from one query of the space's collection (a replica keeps none)."""
        ids = [int(i) for i in image_ids]
        return Candidates.of_groups(np.asarray(ids, np.int64), self.image_vectors(recipe, kind, ids))

    def nearest_images(self, recipe: str, kind: str, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The image and similarity of each query's k nearest vectors (m, k'), NO_ROW-padded, from one search."""
        found = self.nearest_each(recipe, kind, queries, k)
        width = max((len(hits) for hits in found), default=0)
        image_ids = np.full((len(queries), width), NO_ROW, np.int64)
        sims = np.full((len(queries), width), -np.inf, np.float32)
        for i, hits in enumerate(found):
            image_ids[i, : len(hits)] = [row.image_id for row, _ in hits]
            sims[i, : len(hits)] = [sim for _, sim in hits]
        return image_ids, sims

    def _image_vectors(self, recipe, kind, image_ids) -> dict[int, tuple[list[VectorRow], np.ndarray]]:
        record = self._record(recipe, kind)
        if record is None or not image_ids:
            return {}
        rows = self._query(
            record.collection, f"image_id in {_ids(image_ids)}", ["label", "image_id", "box", "score", "vec"]
        )
        found: dict[int, tuple[list[VectorRow], list]] = {}
        for row in sorted(rows, key=lambda r: r["label"]):
            group = found.setdefault(int(row["image_id"]), ([], []))
            group[0].append(self._vector_row(row["label"], row))
            group[1].append(row["vec"])
        return {i: (group, np.asarray(vecs, dtype=np.float32)) for i, (group, vecs) in found.items()}

    def _space_rows(self, recipe: str, kind: str, fields: list[str]) -> list[dict]:
        record = self._record(recipe, kind)
        if record is None:
            return []
        return sorted(self._query(record.collection, "label >= 0", ["label", *fields]), key=lambda r: r["label"])

    def raw_vectors(self, recipe: str, kind: str) -> np.ndarray:
        rows = self._call(self._space_rows, recipe, kind, ["raw"])
        return decode_vectors([_unb64(r["raw"]) for r in rows]) if rows else np.zeros((0, 0), np.float32)

    def tagged_vectors(
        self, recipe: str, kind: str, tags: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        def read() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
            record = self._record(recipe, kind)
            wanted = [int(t) for t in tags]
            rows = (
                []
                if record is None or not wanted
                else self._query(record.collection, f"tag in {_ids(wanted)}", ["label", "image_id", "tag", "raw"])
            )
            rows.sort(key=lambda r: r["label"])
            column = lambda name: np.asarray([r[name] for r in rows], np.int64)  # noqa: E731
            raw = decode_vectors([_unb64(r["raw"]) for r in rows]) if rows else np.zeros((0, 0), np.float32)
            return column("label"), column("image_id"), column("tag"), raw

        return self._call(read)

    def _rebuild_aggregate(self, recipe: str, kind: str) -> None:
        """An aggregate space again from all its parts (their transform or the recipe's learned models changed),
        into a new collection, keeping its own whitening where it still fits; images whose parts came in while
        it was built are combined after the switch."""
        aggregate = self.spec(recipe, kind).aggregate
        old = self._record(recipe, kind)

        def combined(skip: set[int]) -> tuple[list[dict], np.ndarray]:
            rows = [
                r for r in self._space_rows(recipe, aggregate.source, ["image_id", "raw"]) if r["image_id"] not in skip
            ]
            if not rows:
                return [], np.zeros((0, 0), np.float32)
            labels = np.asarray([r["label"] for r in rows], np.int64)
            image_ids = np.asarray([r["image_id"] for r in rows], np.int64)
            ids, first, vectors = self.combine_groups(
                recipe, aggregate, labels, image_ids, decode_vectors([_unb64(r["raw"]) for r in rows])
            )
            made = [
                {
                    "label": int(f),
                    "image_id": int(i),
                    "box": [],
                    "score": 0.0,
                    "tag": NO_TAG,
                    "raw": _b64(encode_vector(v)),
                }
                for i, f, v in zip(ids, first, vectors)
            ]
            return made, vectors

        rows, vectors = combined(set())
        if not rows:
            if old is not None:  # nothing can be combined (a learned model gone): the space goes, as in a restart
                self._client.delete(f"{self._p}_meta", ids=[f"space/{recipe}/{kind}"])
                self._client.drop_collection(old.collection)
            return
        whitening = None if old is None else self._whitening(recipe, kind, old.version)
        if whitening is not None and whitening.mean.shape[0] != vectors.shape[1]:
            whitening = None
        version = old.version if whitening is not None else 0
        dim = whitening.dims if whitening is not None else vectors.shape[1]
        collection = self._space_collection(recipe, kind, dim, version, shared=False)
        record = SpaceRecord(vectors.shape[1], dim, version, old.learned_from if whitening else 0, collection)
        self._copy(rows, vectors, self._space(recipe, kind, record).transform, collection)
        self._save_record(recipe, kind, record)
        late, late_vectors = combined({r["image_id"] for r in rows})
        if late:
            self._copy(late, late_vectors, self._space(recipe, kind, record).transform, collection)
        if old is not None:
            self._client.drop_collection(old.collection)

    def learned(self, recipe: str, name: str) -> tuple[int, np.ndarray, str] | None:
        def read():
            header = self._get_meta(f"learned/{recipe}/{name}")
            if header is None:
                return None
            latest = json.loads(header)
            data = self._get_blob(f"learned/{recipe}/{name}/{latest['version']}")
            return latest["version"], np.load(io.BytesIO(data)), latest["source"]

        return self._call(read)

    def save_learned(self, recipe: str, name: str, data: np.ndarray, source: str) -> int:
        def write() -> int:
            header = self._get_meta(f"learned/{recipe}/{name}")
            version = 1 + (json.loads(header)["version"] if header else 0)
            buffer = io.BytesIO()
            np.save(buffer, np.asarray(data))
            self._put_blob(f"learned/{recipe}/{name}/{version}", buffer.getvalue())
            self._put_meta(f"learned/{recipe}/{name}", json.dumps({"version": version, "source": source}))
            for key in self._aggregates(recipe):
                self._rebuild_aggregate(*key)
            return version

        with self._learning, self._lease(f"lease/{recipe}", LEASE_S) as held:
            if not held:
                raise StoreUnavailable(f"another replica is learning for {recipe}: save {name} again shortly")
            return self._call(write)

    def learned_from(self, recipe: str, kind: str) -> int:
        record = self._call(self._record, recipe, kind)
        return 0 if record is None else record.learned_from

    def learn_whitening(self, recipe: str, kind: str, dims: int | None = None) -> int:
        """Learn the space's transform from its raw vectors into a new collection beside the one in use, switch
        the space to it, copy what was written to the old one meanwhile, drop the old one. One replica at a time
        learns for a recipe (`_lease`); a replica that finds another one learning leaves it to it and returns
        the version in use."""
        with self._learning, self._lease(f"lease/{recipe}", LEASE_S) as held:
            if not held:
                log.info("%s/%s: another replica is learning for %s; left to it", recipe, kind, recipe)
                record = self._call(self._record, recipe, kind)
                return 0 if record is None else record.version
            return self._call(self._learn, recipe, kind, dims)

    @contextmanager
    def claim_live(self, stream_id: str) -> Iterator[None]:
        """One replica at a time writes a live stream (LiveStreamBusy on the others): a lease in `<p>_meta`,
        renewed while the connection lasts, so that a replica that died frees the id after LIVE_LEASE_S."""
        with self._lease(f"live/{stream_id}", LIVE_LEASE_S) as held:
            if not held:
                raise LiveStreamBusy(stream_id)
            yield

    @contextmanager
    def _lease(self, key: str, ttl_s: float) -> Iterator[bool]:
        """Whether this replica holds the lease `key` now (yields True, held until the block ends) or another
        one does (False). Milvus has no compare-and-set: a replica writes its token, waits LEASE_SETTLE_S, and
        holds the lease if its token is still there, so of replicas that try at once only the last writer
        proceeds. The holder renews it every third of `ttl_s`; one left by a replica that died expires."""
        found = self._call(self._get_meta, key)
        if found is not None and json.loads(found)["until"] > time.time():
            yield False
            return
        token = secrets.token_hex(8)

        def write() -> None:
            self._call(self._put_meta, key, json.dumps({"token": token, "until": time.time() + ttl_s}))

        write()
        time.sleep(LEASE_SETTLE_S)
        found = self._call(self._get_meta, key)
        if found is None or json.loads(found)["token"] != token:
            yield False
            return
        done = threading.Event()

        def renew() -> None:
            while not done.wait(ttl_s / 3):
                try:
                    write()
                except StoreUnavailable:  # the store is down: renewed at the next turn if it is back
                    log.warning("%s: the lease could not be renewed; the store is unavailable", key)

        renewer = threading.Thread(target=renew, name=f"lease {key}", daemon=True)
        renewer.start()
        try:
            yield True
        finally:
            done.set()
            renewer.join()
            self._call(self._client.delete, f"{self._p}_meta", ids=[key])

    def _learn(self, recipe: str, kind: str, dims: int | None) -> int:
        spec = self.spec(recipe, kind)
        old = self._record(recipe, kind)
        if old is None:
            raise KeyError(f"{recipe}/{kind} holds no vectors")
        rows = sorted(self._space_rows_in(old.collection), key=lambda r: r["label"])
        raw = decode_vectors([_unb64(r["raw"]) for r in rows])
        training = training_vectors(spec, np.asarray([r["image_id"] for r in rows]), raw)
        whitening = learn_transform(spec, self.config, training, dims)
        version = old.version + 1
        buffer = io.BytesIO()
        np.savez(buffer, mean=whitening.mean, projection=whitening.projection)
        self._put_blob(f"whitening/{recipe}/{kind}/{version}", buffer.getvalue())
        self._whitenings[(recipe, kind, version)] = whitening
        collection = self._space_collection(recipe, kind, whitening.dims, version, shared=False)
        record = SpaceRecord(old.raw_dim, whitening.dims, version, len(training), collection)
        self._copy(rows, raw, whitening.apply, record.collection)
        self._save_record(recipe, kind, record)
        copied = {r["label"] for r in rows}
        now = self._space_rows_in(old.collection)  # written or deleted while the new collection was filled
        late = [r for r in now if r["label"] not in copied]
        if late:
            self._copy(late, decode_vectors([_unb64(r["raw"]) for r in late]), whitening.apply, record.collection)
        deleted = copied - {r["label"] for r in now}
        if deleted:
            self._client.delete(record.collection, ids=sorted(deleted))
        self._client.drop_collection(old.collection)
        for key in self._aggregates(recipe, kind):  # combined from the parts' new transform
            self._rebuild_aggregate(*key)
            aggregate = self._record(*key)
            if self.spec(*key).whiten and aggregate is not None and aggregate.version:
                self._learn(*key, None)
        log.info(
            "%s/%s: transform v%d, %d -> %d dims, from %d vectors",
            recipe,
            kind,
            version,
            old.raw_dim,
            whitening.dims,
            len(training),
        )
        return version

    def _space_rows_in(self, collection: str) -> list[dict]:
        return self._query(collection, "label >= 0", list(ROW_FIELDS))

    def _copy(
        self, rows: list[dict], raw: np.ndarray, transform: Callable[[np.ndarray], np.ndarray], collection: str
    ) -> None:
        vecs = transform(raw) if len(raw) else raw
        batch = []
        for row, vec in zip(rows, vecs):
            batch.append({**{k: row[k] for k in ROW_FIELDS}, "vec": vec.tolist()})
            if len(batch) == 512:
                self._client.upsert(collection, batch)
                batch = []
        if batch:
            self._client.upsert(collection, batch)

    def stats(self) -> list[SpaceStats]:
        def read() -> list[SpaceStats]:
            return [
                SpaceStats(recipe, kind, self._count(r.collection), r.dim, r.version)
                for (recipe, kind), r in sorted(self._records().items())
            ]

        return self._call(read)

    def recipe_bytes(self, recipe: str) -> int:
        """Raw vectors (their stored bytes) and the graph's level-0 entries, as InstanceIndex counts them."""
        total = 0
        for (name, kind), record in self._call(self._records).items():
            if name == recipe:
                rows = self._space_rows(name, kind, ["raw"])
                total += sum(len(_unb64(r["raw"])) for r in rows)
                total += len(rows) * (4 * record.dim + 4 * (2 * self.config.hnsw_m + 1) + 8)
        return total

    def images(self, image_ids: list[int]) -> dict[int, ImageRow]:
        return self._call(self._images, image_ids)

    def _images(self, image_ids: list[int]) -> dict[int, ImageRow]:
        if not image_ids:
            return {}
        fields = ["id", "external_id", "source", "width", "height", "metadata", "video_id", "frame", "time_s", "shot"]
        rows = self._client.get(f"{self._p}_images", ids=sorted({int(i) for i in image_ids}), output_fields=fields)
        videos = {r["video_id"] for r in rows if r["video_id"]}
        video_rows = {}
        if videos:
            for v in self._client.get(f"{self._p}_videos", ids=sorted(videos), output_fields=["source", "metadata"]):
                video_rows[v["video_id"]] = v
        found = {}
        for r in rows:
            video = video_rows.get(r["video_id"]) if r["video_id"] else None
            found[int(r["id"])] = ImageRow(
                int(r["id"]),
                r["external_id"],
                video["source"] if video else r["source"],
                int(r["width"]),
                int(r["height"]),
                dict(video["metadata"] if video else r["metadata"]),
                *((r["video_id"], int(r["frame"]), float(r["time_s"]), int(r["shot"])) if r["video_id"] else ()),
            )
        return found

    def thumbnails(self, image_ids: list[int]) -> dict[int, bytes]:
        def read() -> dict[int, bytes]:
            if not image_ids:
                return {}
            rows = self._client.get(f"{self._p}_images", ids=[int(i) for i in image_ids], output_fields=["thumbnail"])
            return {int(r["id"]): _unb64("".join(r["thumbnail"])) for r in rows if r["thumbnail"]}

        return self._call(read)

    def count_videos(self) -> tuple[int, int]:
        return self._call(
            lambda: (self._count(f"{self._p}_videos"), self._count(f"{self._p}_images", 'video_id != ""'))
        )

    def count_images(self) -> int:
        return self._call(self._count, f"{self._p}_images")

    def snapshot(self) -> None:
        """Nothing to snapshot: Milvus persists every acknowledged write."""

    def close(self) -> None:
        """Close the connection; a milvus-lite file is released too, so that another process may open it."""
        self._client.close()
        if self._local:
            from milvus_lite.server_manager import server_manager_instance

            server_manager_instance.release_server(self.uri)
