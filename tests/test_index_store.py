"""InstanceIndex on a temporary data directory: SQLite is the truth, HNSW graphs are caches of it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from inserve.server.config import IndexConfig
from inserve.server.index import DuplicateId, InstanceIndex, NewVectors
from inserve.server.index.transforms import due, ready

DIM = 8
RECIPE = "dasr_star"
CONFIG = IndexConfig(auto_whiten_per_dim=4.0)  # whitening due at 4 * DIM = 32 vectors


def regions(seed: int, n: int = 3) -> NewVectors:
    rng = np.random.default_rng(seed)
    raw = rng.normal(size=(n, DIM)).astype(np.float32) + 1.0
    boxes = np.array([[10 * i, 5 * i, 10 * i + 40, 5 * i + 30] for i in range(n)], dtype=np.float32)
    return NewVectors(RECIPE, "region", raw, boxes, np.arange(n, 0, -1, dtype=np.float32))


def add(index: InstanceIndex, name: str, seed: int, n: int = 3, **kwargs: object) -> NewVectors:
    vectors = regions(seed, n)
    index.add_image(name, [vectors], width=640, height=480, source=f"/photos/{name}", **kwargs)
    return vectors


def query(index: InstanceIndex, raw: np.ndarray, k: int = 5) -> list[tuple[str, float, tuple | None]]:
    """(external id, similarity, box) of the k nearest region vectors."""
    space = index.space(RECIPE, "region")
    found = index.nearest(RECIPE, "region", space.transform(raw)[0], k)
    images = index.images([row.image_id for row, _ in found])
    return [(images[row.image_id].external_id, sim, row.box) for row, sim in found]


@pytest.fixture
def index(tmp_path: Path):
    index = InstanceIndex(tmp_path / "data", CONFIG)
    yield index
    index.close()


def test_add_then_search_finds_the_vector_with_its_box(index: InstanceIndex) -> None:
    a = add(index, "a", 1)
    add(index, "b", 2)
    hits = query(index, a.raw[1])
    assert hits[0][0] == "a"
    assert hits[0][1] == pytest.approx(1.0, abs=1e-5)
    assert hits[0][2] == (10.0, 5.0, 50.0, 35.0)
    assert index.contains("a") and not index.contains("c")
    assert index.count_images() == 2
    (stats,) = index.stats()
    assert (stats.recipe, stats.kind, stats.vectors, stats.dim, stats.whitening_version) == (RECIPE, "region", 6, 8, 0)


def test_image_metadata_is_stored(index: InstanceIndex) -> None:
    index.add_image("m", [regions(0)], width=64, height=32, source="s", metadata={"k": "v"})
    row = index.store.image_by_external_id("m")
    assert (row.external_id, row.source, row.width, row.height, row.metadata) == ("m", "s", 64, 32, {"k": "v"})


def test_duplicate_id_is_refused_and_changes_nothing(index: InstanceIndex) -> None:
    add(index, "a", 1)
    with pytest.raises(DuplicateId):
        add(index, "a", 2)
    assert index.count_images() == 1
    assert len(index.space(RECIPE, "region")) == 3


def test_replace_swaps_the_vectors(index: InstanceIndex) -> None:
    old = add(index, "a", 1)
    new = add(index, "a", 2, n=2, replace=True)
    assert index.count_images() == 1
    assert len(index.space(RECIPE, "region")) == 2
    assert query(index, new.raw[0])[0][1] == pytest.approx(1.0, abs=1e-5)
    assert all(sim < 0.9999 for _, sim, _ in query(index, old.raw[0]))


def test_delete_removes_hits_and_reports_missing_ids(index: InstanceIndex) -> None:
    a = add(index, "a", 1)
    add(index, "b", 2)
    assert index.delete(["a", "nope"]) == (1, ["nope"])
    assert all(name == "b" for name, _, _ in query(index, a.raw[0]))
    assert len(index.space(RECIPE, "region")) == 3
    assert index.count_images() == 1
    assert index.delete(["a"]) == (0, ["a"])


def test_an_id_deleted_twice_in_one_call_counts_once(index: InstanceIndex) -> None:
    add(index, "a", 1)
    assert index.delete(["a", "a", "nope", "nope"]) == (1, ["nope"])
    assert index.count_images() == 0


def test_dimension_mismatch_is_refused(index: InstanceIndex) -> None:
    add(index, "a", 1)
    wrong = NewVectors(RECIPE, "region", np.ones((1, DIM + 1), dtype=np.float32))
    with pytest.raises(ValueError, match="have 8 dimensions in this index, got 9"):
        index.add_image("b", [wrong], width=10, height=10)
    assert not index.contains("b")  # the transaction rolled back


def search_all(index: InstanceIndex, raws: list[np.ndarray]) -> list[list[tuple]]:
    return [query(index, raw, k=4) for raw in raws]


def test_reopen_gives_the_same_results(tmp_path: Path) -> None:
    index = InstanceIndex(tmp_path, CONFIG)
    vectors = [add(index, f"img{i}", i) for i in range(5)]
    index.delete(["img2"])
    before = search_all(index, [v.raw[0] for v in vectors])
    index.close()
    reopened = InstanceIndex(tmp_path, CONFIG)
    try:
        assert search_all(reopened, [v.raw[0] for v in vectors]) == before
        assert reopened.count_images() == 4 and len(reopened.space(RECIPE, "region")) == 12
    finally:
        reopened.close()


def crash(index: InstanceIndex) -> None:
    """Stop without the closing snapshot: only SQLite and the last snapshot survive (and the lock goes, as it
    goes with a process that dies)."""
    index.store.close()
    index._dir_lock.release()


def test_vectors_added_after_the_snapshot_are_caught_up_from_sqlite(tmp_path: Path) -> None:
    index = InstanceIndex(tmp_path, CONFIG)
    add(index, "a", 1)
    index.snapshot()
    late = add(index, "late", 7)
    expected = query(index, late.raw[2])
    crash(index)
    reopened = InstanceIndex(tmp_path, CONFIG)
    try:
        assert query(reopened, late.raw[2]) == expected
        assert expected[0][0] == "late"
        assert len(reopened.space(RECIPE, "region")) == 6
    finally:
        reopened.close()


def test_deletes_after_the_snapshot_stay_deleted(tmp_path: Path) -> None:
    index = InstanceIndex(tmp_path, CONFIG)
    gone = add(index, "gone", 1)
    add(index, "kept", 2)
    index.snapshot()
    index.delete(["gone"])
    crash(index)
    reopened = InstanceIndex(tmp_path, CONFIG)
    try:
        assert {name for name, _, _ in query(reopened, gone.raw[0])} == {"kept"}
        assert len(reopened.space(RECIPE, "region")) == 3
        assert not reopened.contains("gone")
    finally:
        reopened.close()


def test_replace_after_the_snapshot_survives_a_crash(tmp_path: Path) -> None:
    index = InstanceIndex(tmp_path, CONFIG)
    old = add(index, "a", 1)
    index.snapshot()
    new = add(index, "a", 2, n=2, replace=True)
    crash(index)
    reopened = InstanceIndex(tmp_path, CONFIG)
    try:
        assert len(reopened.space(RECIPE, "region")) == 2
        assert query(reopened, new.raw[1])[0][1] == pytest.approx(1.0, abs=1e-5)
        assert all(sim < 0.9999 for _, sim, _ in query(reopened, old.raw[0]))
    finally:
        reopened.close()


def test_whitening_is_due_at_enough_vectors_per_dimension(index: InstanceIndex) -> None:
    for i in range(10):  # 30 vectors < 4 * 8
        add(index, f"img{i}", i)
    assert not ready(index, RECIPE, "region") and not due(index, RECIPE, "region")
    add(index, "img10", 10)  # 33 vectors
    assert ready(index, RECIPE, "region") and due(index, RECIPE, "region")
    index.learn_whitening(RECIPE, "region")
    assert ready(index, RECIPE, "region") and not due(index, RECIPE, "region")
    assert not ready(index, RECIPE, "global")  # no such space


def test_never_due_when_auto_whitening_is_off(tmp_path: Path) -> None:
    index = InstanceIndex(tmp_path, IndexConfig(auto_whiten_per_dim=0))
    try:
        for i in range(20):
            add(index, f"img{i}", i)
        assert not due(index, RECIPE, "region")
    finally:
        index.close()


def test_learning_whitening_bumps_the_version_and_search_still_works(tmp_path: Path) -> None:
    index = InstanceIndex(tmp_path, CONFIG)
    vectors = [add(index, f"img{i}", i) for i in range(12)]
    assert index.learn_whitening(RECIPE, "region", dims=6) == 1
    (stats,) = index.stats()
    assert (stats.whitening_version, stats.dim, stats.vectors) == (1, 6, 36)
    for i in (0, 5, 11):
        assert query(index, vectors[i].raw[1])[0][0] == f"img{i}"
    assert index.learn_whitening(RECIPE, "region") == 2
    assert index.stats()[0].dim == 8
    late = add(index, "late", 99)  # added under whitening v2
    before = search_all(index, [vectors[3].raw[0], late.raw[0]])
    assert before[1][0][0] == "late"
    index.close()
    reopened = InstanceIndex(tmp_path, CONFIG)
    try:
        assert reopened.stats()[0].whitening_version == 2
        assert search_all(reopened, [vectors[3].raw[0], late.raw[0]]) == before
    finally:
        reopened.close()


def test_learning_whitening_needs_two_vectors(index: InstanceIndex) -> None:
    add(index, "a", 1, n=1)
    with pytest.raises(ValueError, match="holds 1 vectors"):
        index.learn_whitening(RECIPE, "region")
