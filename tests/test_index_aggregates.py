"""The index's per-space settings: aggregates rebuilt from whitened parts, per-image whitening samples,
non-searchable spaces, tags for online aggregation, learned models, and the v1 -> v2 schema upgrade. What
aggregates do is checked on both stores (a data directory and Milvus, as milvus-lite)."""

import sqlite3
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from inserve.server.config import IndexConfig
from inserve.server.index import Aggregate, InstanceIndex, NewVectors, SpaceSpec
from inserve.server.index.transforms import training_vectors
from inserve.server.recipes.cam import online_aggregates
from inserve.server.stages.matching import sum_normalized
from inserve.server.stages.pooling import l2_normalize

CONFIG = IndexConfig(auto_whiten_per_dim=0)


def summed(parts: np.ndarray, learned: object) -> np.ndarray:
    return sum_normalized(parts)


def scaled_by_codebook(parts: np.ndarray, learned) -> np.ndarray | None:
    codebook = learned("codebook")
    return None if codebook is None else parts.sum(axis=0) * codebook[0]


SPECS = {
    ("r", "part"): SpaceSpec(searchable=False, whiten_per_image=2),
    ("r", "global"): SpaceSpec(whiten=False, aggregate=Aggregate("part", summed)),
    ("v", "part"): SpaceSpec(searchable=False, whiten=False),
    ("v", "global"): SpaceSpec(whiten=False, aggregate=Aggregate("part", scaled_by_codebook, on_raw=True)),
    ("w", "part"): SpaceSpec(searchable=False, whiten=False),
    ("w", "global"): SpaceSpec(aggregate=Aggregate("part", summed, on_raw=True)),
}


@pytest.fixture
def reopen(open_store: Callable):
    return lambda: open_store(CONFIG, SPECS)


def _parts(rng: np.random.Generator, n: int, dim: int = 4) -> np.ndarray:
    return rng.normal(size=(n, dim)).astype(np.float32)


def _fill(index: InstanceIndex, images: int = 6, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    stored = {}
    for i in range(images):
        parts = _parts(rng, 3)
        stored[f"img{i}"] = parts
        tags = np.array([i % 2, 2, 3 + i])
        index.add_image(f"img{i}", [NewVectors("r", "part", parts, tags=tags)], width=10, height=10)
    return stored


def test_aggregate_is_the_sum_of_the_parts_and_follows_their_whitening(reopen) -> None:
    index = reopen()
    stored = _fill(index)
    space = index.space("r", "global")
    assert len(space) == 6 and not index.space("r", "part").searchable
    query = stored["img3"]
    expected = sum_normalized(l2_normalize(query))
    np.testing.assert_allclose(index.transform("r", "global", query), expected, rtol=1e-5, atol=1e-6)
    (row, sim), *_ = index.nearest("r", "global", expected, 6)
    assert row.box is None and abs(sim - 1.0) < 1e-5
    assert index.images([row.image_id])[row.image_id].external_id == "img3"

    index.learn_whitening("r", "part")
    whitening = index.space("r", "part").whitening
    assert whitening is not None
    expected = sum_normalized(whitening.apply(query))
    np.testing.assert_allclose(index.transform("r", "global", query), expected, rtol=1e-4, atol=1e-5)
    (row, sim), *_ = index.nearest("r", "global", expected, 6)
    assert index.images([row.image_id])[row.image_id].external_id == "img3" and abs(sim - 1.0) < 1e-4

    reopened = reopen()  # aggregates are rebuilt from SQLite, or read from Milvus
    np.testing.assert_allclose(reopened.transform("r", "global", query), expected, rtol=1e-4, atol=1e-5)
    assert len(reopened.space("r", "global")) == 6
    reopened.delete(["img3"])
    assert len(reopened.space("r", "global")) == 5


def test_whitening_learns_from_the_first_n_vectors_of_each_image(tmp_path: Path) -> None:
    index = InstanceIndex(tmp_path, CONFIG, SPECS)
    stored = _fill(index)
    _, image_ids, raw = index.store.space_vectors("r", "part")
    training = training_vectors(index.spec("r", "part"), image_ids, raw)
    np.testing.assert_array_equal(training, np.concatenate([stored[f"img{i}"][:2] for i in range(6)]))
    index.close()


def test_tagged_aggregation_keeps_only_the_query_tags(reopen) -> None:
    index = reopen()
    stored = _fill(index)
    query_parts = stored["img1"][[0, 1]]  # tags 1 and 2
    query, ids, _, vectors = online_aggregates(index, "r", "global", query_parts, np.array([1, 2]))
    np.testing.assert_allclose(query, sum_normalized(l2_normalize(query_parts)), rtol=1e-5)
    names = {i: index.images([int(i)])[int(i)].external_id for i in ids}
    for image_id, vector in zip(ids, vectors):
        parts = stored[names[image_id]]
        n = int(names[image_id][3:])
        keep = [0, 1] if n % 2 == 1 else [1]  # tag i % 2 matches 1 for odd images only; tag 2 always
        np.testing.assert_allclose(vector, sum_normalized(l2_normalize(parts[keep])), rtol=1e-5, atol=1e-6)
    index.close()


def test_aggregate_waits_for_its_learned_model_and_is_rebuilt_with_it(reopen) -> None:
    index = reopen()
    parts = np.array([[3.0, 4.0], [0.0, 2.0]], dtype=np.float32)
    index.add_image("a", [NewVectors("v", "part", parts)], width=10, height=10)
    assert index.space("v", "global") is None  # no codebook yet
    assert index.save_learned("v", "codebook", np.array([[2.0, 1.0]]), "other data") == 1
    raw_sum = l2_normalize(parts).sum(axis=0) * np.array([2.0, 1.0])  # on_raw: l2-normalised raw parts
    np.testing.assert_allclose(index.transform("v", "global", parts), l2_normalize(raw_sum), rtol=1e-6)
    assert index.save_learned("v", "codebook", np.array([[1.0, 1.0]]), "again") == 2
    version, codebook, source = index.learned("v", "codebook")
    assert (version, source) == (2, "again")
    np.testing.assert_array_equal(codebook, [[1.0, 1.0]])
    index.close()


def test_whitened_aggregate_learns_from_the_aggregates(reopen) -> None:
    index = reopen()
    rng = np.random.default_rng(1)
    stored = {f"img{i}": _parts(rng, 3) for i in range(8)}
    for name, parts in stored.items():
        index.add_image(name, [NewVectors("w", "part", parts)], width=10, height=10)
    aggregates = np.stack([summed(l2_normalize(p), None) for p in stored.values()])
    assert index.learn_whitening("w", "global") == 1
    whitening = index.space("w", "global").whitening
    np.testing.assert_allclose(whitening.mean, aggregates.mean(axis=0), rtol=1e-5, atol=1e-6)  # learned on them
    np.testing.assert_allclose(
        index.transform("w", "global", stored["img5"]), whitening.apply(aggregates[5])[0], rtol=1e-4, atol=1e-5
    )
    index.close()


def test_non_searchable_space_refuses_knn(tmp_path: Path) -> None:
    index = InstanceIndex(tmp_path, CONFIG, SPECS)
    _fill(index, images=2)
    with pytest.raises(ValueError, match="no graph"):
        index.nearest("r", "part", np.ones(4, np.float32), 1)
    found = index.image_vectors("r", "part", [1])
    assert list(found) == [1] and found[1][1].shape == (3, 4)
    index.close()


def test_schema_1_index_is_upgraded_in_place(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "index.sqlite")
    db.executescript(
        """
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO meta VALUES ('schema_version', '1');
        CREATE TABLE images (id INTEGER PRIMARY KEY AUTOINCREMENT, external_id TEXT NOT NULL UNIQUE,
            source TEXT NOT NULL DEFAULT '', width INTEGER NOT NULL, height INTEGER NOT NULL,
            metadata TEXT NOT NULL DEFAULT '{}', thumbnail BLOB, created REAL NOT NULL);
        CREATE TABLE vectors (label INTEGER PRIMARY KEY AUTOINCREMENT, image_id INTEGER NOT NULL
            REFERENCES images(id) ON DELETE CASCADE, recipe TEXT NOT NULL, kind TEXT NOT NULL,
            x1 REAL, y1 REAL, x2 REAL, y2 REAL, score REAL NOT NULL DEFAULT 0, raw BLOB NOT NULL);
        """
    )
    db.close()
    index = InstanceIndex(tmp_path, CONFIG, SPECS)
    index.add_image("a", [NewVectors("r", "part", np.ones((1, 4), np.float32), tags=np.array([7]))], width=1, height=1)
    assert index.store.tagged_vectors("r", "part", [7])[2].tolist() == [7]
    assert index.store.get_meta("schema_version") == "6"  # 3: tags, learned models; 4: int8; 5: videos; 6: live
    assert index.images([1])[1].video_id is None
    index.close()
