"""Compact spaces (SpaceSpec.compact): a PCA reduction (or, with `whiten`, PCA-whitening) learned on the space's
own vectors, re-learned as it doubles, int8 raw vectors in SQLite; everything else behaves as in any space."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from inserve.server.config import ConfigError, IndexConfig
from inserve.server.index import InstanceIndex, NewVectors, SpaceSpec
from inserve.server.index.transforms import due, learn_transforms, learns
from inserve.server.stages.whitening import pca_reduce, pca_whiten

DIM, RECIPE = 8, "whole_and_regions"
SPECS = {(RECIPE, "region"): SpaceSpec(whiten=False, compact=True)}
CONFIG = IndexConfig(compact_dims=4, compact_after=16)


def add(index: InstanceIndex, name: str, seed: int, n: int = 4) -> np.ndarray:
    rng = np.random.default_rng(seed)
    raw = (rng.normal(size=(n, DIM)) * np.linspace(3, 0.5, DIM) + 1).astype(np.float32)
    boxes = np.tile(np.array([[0, 0, 10, 10]], dtype=np.float32), (n, 1))
    index.add_image(name, [NewVectors(RECIPE, "region", raw, boxes)], width=64, height=64)
    return raw


def learn_when_due(index: InstanceIndex) -> bool:
    return bool(learn_transforms(index, due, RECIPE))


def top_hit(index: InstanceIndex, raw: np.ndarray) -> tuple[str, float]:
    found = index.nearest(RECIPE, "region", index.transform(RECIPE, "region", raw), 1)
    ((row, sim),) = found
    return index.images([row.image_id])[row.image_id].external_id, sim


@pytest.fixture
def index(tmp_path: Path):
    index = InstanceIndex(tmp_path / "data", CONFIG, SPECS)
    yield index
    index.close()


def test_raw_vectors_are_int8_and_the_graph_full_dims_until_the_reduction_is_learned(index: InstanceIndex) -> None:
    for i in range(3):
        add(index, f"p{i}", i)
        assert not learn_when_due(index)
    (stats,) = index.stats()
    assert (stats.vectors, stats.dim, stats.whitening_version) == (12, DIM, 0)
    assert index.store.space_bytes(RECIPE) == 12 * 13  # 1 header + 4 scale + 8 values (13 = 1 mod 4, no pad)
    assert learns(index.spec(RECIPE, "region"), index.config)


def test_reduction_is_learned_at_compact_after_and_each_doubling(index: InstanceIndex) -> None:
    learned = {}
    for i in range(16):  # 4 vectors per image: 64 vectors
        add(index, f"p{i}", i)
        if learn_when_due(index):
            learned[len(index.space(RECIPE, "region"))] = index.store.learned_from(RECIPE, "region")
    assert learned == {16: 16, 32: 32, 64: 64}
    (stats,) = index.stats()
    assert (stats.dim, stats.whitening_version) == (4, 3)


def test_relearning_stops_at_64_times_compact_after(tmp_path: Path) -> None:
    index = InstanceIndex(tmp_path / "data", IndexConfig(compact_dims=4, compact_after=2), SPECS)
    sizes = []
    for i in range(80):  # 320 vectors: due at 2, 4, ..., 128, then no more
        add(index, f"p{i}", i)
        if learn_when_due(index):
            sizes.append(index.store.learned_from(RECIPE, "region"))
    index.close()
    assert sizes == [4, 8, 16, 32, 64, 128]  # 4 vectors per image: the first learning finds 4 >= 2


def test_search_after_the_reduction_finds_each_vector_and_survives_reopening(tmp_path: Path) -> None:
    index = InstanceIndex(tmp_path / "data", CONFIG, SPECS)
    raws = {f"p{i}": add(index, f"p{i}", i) for i in range(6)}
    assert learn_when_due(index)
    raws["late"] = add(index, "late", 99)  # added after the reduction: int8 raw, 4-dim graph entry
    before = {name: top_hit(index, raw[2]) for name, raw in raws.items()}
    index.close()
    reopened = InstanceIndex(tmp_path / "data", CONFIG, SPECS)
    (stats,) = reopened.stats()
    assert (stats.dim, stats.whitening_version) == (4, 1)
    for name, raw in raws.items():
        assert before[name][0] == name and before[name][1] == pytest.approx(1.0, abs=1e-4)
        found, sim = top_hit(reopened, raw[2])
        assert found == name and sim == pytest.approx(1.0, abs=1e-4)  # the graph holds int8 raw: rounding
    reopened.close()


def test_compact_dims_0_keeps_full_dims_in_float32(tmp_path: Path) -> None:
    index = InstanceIndex(tmp_path / "data", IndexConfig(compact_dims=0, compact_after=16), SPECS)
    for i in range(8):
        add(index, f"p{i}", i)
    assert not learns(index.spec(RECIPE, "region"), index.config) and not due(index, RECIPE, "region")
    assert index.store.space_bytes(RECIPE) == 32 * 4 * DIM
    index.close()


def test_bad_compact_settings_are_refused() -> None:
    with pytest.raises(ConfigError, match="compact_dims"):
        IndexConfig(compact_dims=-1)
    with pytest.raises(ConfigError, match="compact_after"):
        IndexConfig(compact_after=1)


def test_writes_while_the_graph_is_rebuilt_are_caught_up(index: InstanceIndex, monkeypatch) -> None:
    raws = {f"p{i}": add(index, f"p{i}", i) for i in range(4)}
    read_all = index.store.vectors
    written = []

    def read_then_write(recipe: str, kind: str, after_label: int = 0):
        found = read_all(recipe, kind, after_label)
        if not written:  # the rebuild's read: a write and a delete land after it
            written.append(add(index, "late", 77))
            index.delete(["p0"])
        return found

    monkeypatch.setattr(index.store, "vectors", read_then_write)
    index.learn_whitening(RECIPE, "region")
    assert index.stats()[0].dim == 4 and len(index.space(RECIPE, "region")) == 16  # 4 x 4 - p0's 4 + late's 4
    assert top_hit(index, written[0][1])[0] == "late"
    assert all(top_hit(index, raw)[0] != "p0" for raw in raws["p0"])


def test_a_compact_space_that_whitens_learns_whitening_to_its_dims(tmp_path: Path) -> None:
    """whole_and_regions' photos: int8 raw, learned as the space grows, PCA-whitening (not the reduction) to
    the space's whiten_dims."""
    specs = {(RECIPE, "region"): SpaceSpec(compact=True, whiten_dims=3)}
    index = InstanceIndex(tmp_path / "data", CONFIG, specs)
    for i in range(4):
        add(index, f"p{i}", i)
    assert learn_when_due(index)
    raw = index.raw_vectors(RECIPE, "region")
    probe = raw[:5]
    expected = pca_whiten(raw, 3, shrinkage=CONFIG.whiten_shrinkage).apply(probe)
    got = np.stack([index.transform(RECIPE, "region", v) for v in probe])
    assert got.shape == (5, 3) and index.stats()[0].dim == 3
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert not np.allclose(np.abs(got), np.abs(pca_reduce(raw, 3).apply(probe)), atol=1e-2)
    assert index.store.space_bytes(RECIPE) == 16 * 13  # int8
    index.close()
