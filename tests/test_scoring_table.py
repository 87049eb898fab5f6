"""The in-memory scoring table: rows grouped by image whatever order they come in, gathered back exactly (float32)
or within float16's rounding, kept in step with deletes and replacements, compacted without losing a row; and
through the index, the same hits from a data directory reopened as from the one that wrote it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from inserve.server.config import IndexConfig
from inserve.server.index import InstanceIndex, NewVectors
from inserve.server.index.scoring_table import NO_ROW, ScoringTable

DIM = 6


def rows(image_id: int, first_label: int, n: int, seed: int) -> tuple:
    vectors = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    boxes = np.arange(4 * n, dtype=np.float32).reshape(n, 4) + image_id
    labels = np.arange(first_label, first_label + n)
    return labels, np.full(n, image_id), vectors, boxes, np.linspace(0, 1, n, dtype=np.float32)


def table_of(*images: tuple, dtype: str = "float32") -> ScoringTable:
    table = ScoringTable(DIM, dtype)
    for image in images:
        table.add(*image)
    return table


def test_gather_gives_each_images_rows_in_the_order_asked() -> None:
    a, b, c = rows(7, 1, 3, 0), rows(2, 4, 2, 1), rows(9, 6, 4, 2)
    table = table_of(a, b, c)
    found = table.gather([9, 5, 7])  # 5 holds nothing: left out
    assert found.image_ids.tolist() == [9, 7] and found.offsets.tolist() == [0, 4, 7]
    np.testing.assert_array_equal(found.vectors, np.concatenate([c[2], a[2]]))
    np.testing.assert_array_equal(found.labels, np.concatenate([c[0], a[0]]))
    np.testing.assert_array_equal(found.boxes, np.concatenate([c[3], a[3]]))
    np.testing.assert_array_equal(found.scores, np.concatenate([c[4], a[4]]))
    assert table.image_ids(np.array([[5, 1], [99, 8]])).tolist() == [[2, 7], [NO_ROW, 9]]


def test_rows_of_several_images_in_one_add_are_grouped_by_image() -> None:
    """As a start-up load gives them: in label order, which need not keep an image's rows together."""
    labels = np.array([1, 2, 3, 4, 5])
    image_ids = np.array([3, 8, 3, 8, 3])
    vectors = np.eye(5, DIM, dtype=np.float32)
    table = table_of((labels, image_ids, vectors, None, None))
    found = table.gather([3, 8])
    assert found.offsets.tolist() == [0, 3, 5] and found.labels.tolist() == [1, 3, 5, 2, 4]
    assert np.isnan(found.boxes).all()
    with pytest.raises(ValueError, match="has rows already"):
        table.add(np.array([6]), np.array([8]), vectors[:1])


def test_removed_rows_are_gone_and_compaction_keeps_the_rest(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("inserve.server.index.scoring_table.MIN_COMPACT", 1)
    images = [rows(i, 1 + 3 * i, 3, i) for i in range(6)]
    table = table_of(*images)
    table.remove(np.concatenate([images[i][0] for i in (0, 2, 3)]))  # half the rows: compacted
    assert len(table) == 9 and table._size == 9
    found = table.gather(range(6))
    assert found.image_ids.tolist() == [1, 4, 5]
    np.testing.assert_array_equal(found.vectors, np.concatenate([images[i][2] for i in (1, 4, 5)]))
    assert table.image_ids(images[2][0]).tolist() == [NO_ROW] * 3
    np.testing.assert_array_equal(table.vectors(images[4][0]), images[4][2])
    with pytest.raises(KeyError):
        table.vectors(images[0][0])
    table.add(*rows(2, 100, 2, 9))  # a replaced image comes back under its own new labels
    assert table.gather([2]).labels.tolist() == [100, 101]


def test_float16_rows_are_within_its_rounding() -> None:
    image = rows(1, 1, 50, 3)
    vectors = image[2] / np.linalg.norm(image[2], axis=1, keepdims=True)
    table = table_of((*image[:2], vectors, *image[3:]), dtype="float16")
    found = table.gather([1])
    np.testing.assert_allclose(found.vectors, vectors, atol=1e-3)
    assert np.abs(found.vectors @ vectors[0] - vectors @ vectors[0]).max() < 2e-3
    assert table.nbytes < table_of(image).nbytes


def test_the_index_keeps_the_table_in_step_and_rebuilds_it_at_start(tmp_path: Path) -> None:
    """Adds, a replace and a delete, then a reopen (the table rebuilt from SQLite): the same candidates."""
    config = IndexConfig(auto_whiten_per_dim=0, scoring_precision="float32")
    index = InstanceIndex(tmp_path, config)
    rng = np.random.default_rng(5)
    for name in "abcd":
        boxes = rng.uniform(0, 50, size=(3, 4)).astype(np.float32)
        index.add_image(
            name, [NewVectors("r", "region", rng.normal(size=(3, DIM)).astype(np.float32), boxes)], width=64, height=64
        )
    index.add_image(
        "b",
        [NewVectors("r", "region", rng.normal(size=(2, DIM)).astype(np.float32))],
        width=64,
        height=64,
        replace=True,
    )
    index.delete(["c"])
    ids = sorted(index.images(list(range(1, 10))))
    before = index.candidates("r", "region", ids)
    labels = np.concatenate([before.labels, [10_000]])
    sims_before = index.nearest_images("r", "region", before.vectors[:2], 4)
    index.close()
    reopened = InstanceIndex(tmp_path, config)
    try:
        after = reopened.candidates("r", "region", ids)
        assert len(before) == 3 and after.image_ids.tolist() == before.image_ids.tolist()
        for name in ("offsets", "vectors", "labels", "scores"):
            np.testing.assert_array_equal(getattr(after, name), getattr(before, name))
        np.testing.assert_array_equal(np.isnan(after.boxes), np.isnan(before.boxes))
        np.testing.assert_array_equal(np.nan_to_num(after.boxes), np.nan_to_num(before.boxes))
        assert reopened.space("r", "region").table.image_ids(labels)[-1] == NO_ROW
        for a, b in zip(reopened.nearest_images("r", "region", before.vectors[:2], 4), sims_before):
            np.testing.assert_array_equal(a, b)
    finally:
        reopened.close()
