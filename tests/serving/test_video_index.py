"""Keyframes in the index: schema migration, atomic replacement of a video's keyframes, grouping."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import numpy as np
import pytest

from inserve.server.config import IndexConfig
from inserve.server.grouping import group_hits
from inserve.server.index import DuplicateId, ImageRow, InstanceIndex, NewKeyframe, NewVectors
from inserve.server.index.store import SCHEMA, SCHEMA_VERSION, MetadataStore
from inserve.server.search import Hit


def vectors(seed: int, n: int = 2) -> list[NewVectors]:
    raw = np.random.default_rng(seed).normal(size=(n, 8)).astype(np.float32)
    boxes = np.tile(np.array([[1, 2, 30, 40]], dtype=np.float32), (n, 1))
    return [NewVectors("r", "region", raw, boxes, np.ones(n, dtype=np.float32))]


def keyframes(video: str, frames: list[int], seed: int = 0) -> list[NewKeyframe]:
    return [NewKeyframe(f"{video}#{f}", f, f / 25, i, 64, 48, vectors(seed + f)) for i, f in enumerate(frames)]


def test_a_version_1_index_is_migrated_in_place(tmp_path: Path) -> None:
    path = tmp_path / "index.sqlite"
    db = sqlite3.connect(path)
    db.executescript(SCHEMA)
    db.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    db.execute("INSERT INTO images (external_id, width, height, created) VALUES ('old.jpg', 10, 20, 0)")
    db.commit()
    db.close()
    store = MetadataStore(path)
    try:
        assert store.get_meta("schema_version") == str(SCHEMA_VERSION) == "6"
        row = store.image_by_external_id("old.jpg")
        assert (row.width, row.height) == (10, 20)
        assert (row.video_id, row.frame, row.time_s, row.shot) == (None, None, None, None)
        assert store.count_videos() == (0, 0)
    finally:
        store.close()
    reopened = MetadataStore(path)  # migrating twice is a no-op
    reopened.close()


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    store = MetadataStore(tmp_path / "index.sqlite")
    store.set_meta("schema_version", "99")
    store.close()
    with pytest.raises(RuntimeError, match="schema version 99"):
        MetadataStore(tmp_path / "index.sqlite")


def test_reindexing_a_video_replaces_all_its_keyframes(tmp_path: Path) -> None:
    index = InstanceIndex(tmp_path, IndexConfig(auto_whiten_per_dim=0))
    try:
        index.add_image("photo.jpg", vectors(99), width=10, height=10)
        assert index.replace_video("v", keyframes("v", [0, 50, 100]), source="v.mp4") == 0
        assert [r.frame for r in index.store.keyframes("v")] == [0, 50, 100]
        assert index.replace_video("v", keyframes("v", [0, 75], seed=1000), source="v.mp4") == 3
        rows = index.store.keyframes("v")
        assert [(r.external_id, r.frame, r.time_s, r.shot) for r in rows] == [("v#0", 0, 0.0, 0), ("v#75", 75, 3.0, 1)]
        assert len(index.space("r", "region")) == 2 * 2 + 2  # two keyframes and the photo, two vectors each
        assert index.store.count_videos() == (1, 2)
        assert index.count_images() == 3
    finally:
        index.close()


def test_a_failed_replacement_leaves_the_old_keyframes(tmp_path: Path) -> None:
    index = InstanceIndex(tmp_path, IndexConfig(auto_whiten_per_dim=0))
    try:
        index.add_image("v#75", vectors(99), width=10, height=10)  # an image that happens to have a keyframe's id
        index.replace_video("v", keyframes("v", [0, 50]))
        with pytest.raises(DuplicateId):
            index.replace_video("v", keyframes("v", [0, 75], seed=1000))
        assert [r.frame for r in index.store.keyframes("v")] == [0, 50]
        assert len(index.space("r", "region")) == 6
    finally:
        index.close()


def test_appending_keyframes_is_idempotent_and_keeps_live_streams_and_files_apart(tmp_path: Path) -> None:
    index = InstanceIndex(tmp_path, IndexConfig(auto_whiten_per_dim=0))
    try:
        assert index.store.live_resume("cam") is None
        added = index.append_keyframes("cam", keyframes("cam", [0, 50]), live=True, source="rtsp://cam")
        assert [k.external_id for k in added] == ["cam#0", "cam#50"]
        again = index.append_keyframes("cam", keyframes("cam", [50, 100], seed=7), live=True, source="ignored")
        assert [k.external_id for k in again] == ["cam#100"]  # cam#50 is stored: skipped, not stored twice
        assert len(index.space("r", "region")) == 3 * 2
        resume = index.store.live_resume("cam")
        assert (resume.keyframes, resume.last_time_s, resume.last_shot) == (3, 4.0, 1)
        assert {r.source for r in index.store.keyframes("cam")} == {"rtsp://cam"}  # the first commit's

        index.append_keyframes("file", keyframes("file", [0]), live=False)
        index.add_image("photo", vectors(99), width=10, height=10)
        for video_id, live, reason in (
            ("file", True, "a video file is indexed"),
            ("cam", False, "a live stream is indexed"),
            ("photo", True, "an image is indexed"),
        ):
            with pytest.raises(DuplicateId) as taken:
                index.append_keyframes(video_id, keyframes(video_id, [200]), live=live)
            assert reason in taken.value.reason
        with pytest.raises(DuplicateId):
            index.store.live_resume("file")
        assert index.replace_video("cam", keyframes("cam", [0])) == 3  # a file replaces a stream whole
        with pytest.raises(DuplicateId):
            index.store.live_resume("cam")
    finally:
        index.close()


def test_readers_see_the_old_keyframes_until_the_new_set_commits(tmp_path: Path, monkeypatch) -> None:
    index = InstanceIndex(tmp_path, IndexConfig(auto_whiten_per_dim=0))
    store = index.store
    index.replace_video("v", keyframes("v", [0, 50]))
    inserting, proceed = threading.Event(), threading.Event()
    insert = store._insert_image

    def slow_insert(*args, **kwargs):
        inserting.set()
        proceed.wait(10)
        return insert(*args, **kwargs)

    monkeypatch.setattr(store, "_insert_image", slow_insert)
    writer = threading.Thread(target=index.replace_video, args=("v", keyframes("v", [10, 20, 30], seed=7)))
    writer.start()
    try:
        assert inserting.wait(10)  # the old keyframes are deleted inside the open transaction
        seen = []
        reader = threading.Thread(target=lambda: seen.extend(r.frame for r in store.keyframes("v")))
        reader.start()
        reader.join(10)
        assert seen == [0, 50]
    finally:
        proceed.set()
        writer.join(10)
    assert [r.frame for r in store.keyframes("v")] == [10, 20, 30]
    index.close()


def test_deleting_a_video_id_deletes_its_keyframes(tmp_path: Path) -> None:
    index = InstanceIndex(tmp_path, IndexConfig(auto_whiten_per_dim=0))
    try:
        index.replace_video("v", keyframes("v", [0, 50]))
        index.add_image("photo.jpg", vectors(99), width=10, height=10)
        assert index.delete(["v", "nope"]) == (1, ["nope"])
        assert index.store.keyframes("v") == [] and index.count_images() == 1
        assert len(index.space("r", "region")) == 2
    finally:
        index.close()


def test_image_and_video_ids_share_one_namespace(tmp_path: Path) -> None:
    index = InstanceIndex(tmp_path, IndexConfig(auto_whiten_per_dim=0))
    try:
        index.add_image("photo", vectors(1), width=10, height=10)
        index.replace_video("v", keyframes("v", [0, 50]))
        with pytest.raises(DuplicateId) as taken:
            index.replace_video("photo", keyframes("photo", [0]))
        assert taken.value.reason == "an image is indexed under this id"
        for replace in (False, True):
            with pytest.raises(DuplicateId) as taken:
                index.add_image("v", vectors(2), width=10, height=10, replace=replace)
            assert taken.value.reason == "a video is indexed under this id"
        with pytest.raises(DuplicateId) as taken:  # a keyframe never turns into an image
            index.add_image("v#50", vectors(3), width=10, height=10, replace=True)
        assert "a keyframe of video 'v'" in taken.value.reason
        assert [r.frame for r in index.store.keyframes("v")] == [0, 50] and index.count_images() == 3
        assert index.delete(["v#0"]) == (1, []) and [r.frame for r in index.store.keyframes("v")] == [50]
    finally:
        index.close()


def test_a_videos_source_and_metadata_are_stored_once_and_go_with_its_last_keyframe(tmp_path: Path) -> None:
    index = InstanceIndex(tmp_path, IndexConfig(auto_whiten_per_dim=0))
    try:
        metadata = {"camera": "x" * 10_000}
        index.store.replace_video("v", "cam.mp4", metadata, keyframes("v", list(range(0, 500, 10))))
        db = index.store._db()
        assert db.execute("SELECT SUM(LENGTH(metadata)) FROM images").fetchone()[0] == 50 * len("{}")
        assert db.execute("SELECT COUNT(*) FROM videos").fetchone()[0] == 1
        rows = index.store.keyframes("v")
        assert len(rows) == 50 and all(r.metadata == metadata and r.source == "cam.mp4" for r in rows)
        assert index.store.image_by_external_id("v#490").metadata == metadata
        index.delete([f"v#{f}" for f in range(0, 490, 10)])
        assert db.execute("SELECT COUNT(*) FROM videos").fetchone()[0] == 1  # one keyframe left
        index.delete(["v#490"])
        assert db.execute("SELECT COUNT(*) FROM videos").fetchone()[0] == 0
        db.execute(  # a keyframe of an index written before the videos table keeps its own
            "INSERT INTO images (external_id, source, width, height, metadata, created, video_id, frame)"
            " VALUES ('old#0', 'old.mp4', 8, 8, '{\"k\": \"v\"}', 0, 'old', 0)"
        )
        assert index.store.keyframes("old")[0].metadata == {"k": "v"}
        assert index.store.keyframes("old")[0].source == "old.mp4"
    finally:
        index.close()


def file_bytes(store: MetadataStore) -> int:
    store._db().execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return store.path.stat().st_size


def test_deleting_large_keyframes_gives_the_space_back(tmp_path: Path) -> None:
    index = InstanceIndex(tmp_path, IndexConfig(auto_whiten_per_dim=0))
    try:
        index.add_image("photo", vectors(1), width=10, height=10)
        empty = file_bytes(index.store)
        frames = [NewKeyframe(f"v#{f}", f, f / 25, 0, 64, 48, vectors(f), thumbnail=bytes(64 << 10)) for f in range(60)]
        index.replace_video("v", frames)  # 60 x 64 KiB thumbnails: about 4 MiB
        assert file_bytes(index.store) > empty + (3 << 20)
        index.delete(["v"])
        assert file_bytes(index.store) < empty + (1 << 20)
    finally:
        index.close()


def test_an_index_from_before_incremental_vacuum_is_converted_once(tmp_path: Path) -> None:
    path = tmp_path / "index.sqlite"
    db = sqlite3.connect(path)
    db.execute("PRAGMA auto_vacuum = NONE")
    db.executescript(SCHEMA)
    db.close()
    store = MetadataStore(path)
    assert store._db().execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # INCREMENTAL
    store.close()


def row(i: int, video: str | None = None, shot: int | None = None) -> ImageRow:
    return ImageRow(i, f"id{i}", "", 10, 10, {}, video, None if video is None else i, None, shot)


def test_grouping_keeps_the_best_hit_of_each_video_or_shot() -> None:
    images = [row(1, "a", 0), row(2, "a", 1), row(3), row(4, "b", 0), row(5, "a", 0), row(6), row(7, "b", 0)]
    hits = [Hit(image, 1.0 - i / 10, None, 0.0, i) for i, image in enumerate(images)]
    assert [h.image.id for h in group_hits(hits, "none")] == [1, 2, 3, 4, 5, 6, 7]
    assert [h.image.id for h in group_hits(hits, "video")] == [1, 3, 4, 6]
    assert [h.image.id for h in group_hits(hits, "shot")] == [1, 2, 3, 4, 6]
    with pytest.raises(ValueError):
        group_hits(hits, "scene")
