"""What only the Milvus store has to get right: refusing stores it cannot read, unreachable stores, and writes
of another replica landing while a space learns its transform (milvus-lite: a real Milvus engine, embedded)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_region_set_search import BOXES, IMAGES, PHOTOS, QUERY, WHOLE_QUERY
from test_region_set_search import SPECS as SET_SPECS

from inserve.server.config import IndexConfig, ServerConfig
from inserve.server.errors import ConfigError, StoreUnavailable
from inserve.server.index import NewVectors, open_index
from inserve.server.index.milvus import STORE_FORMAT, MilvusIndex, SnowflakeIds
from inserve.server.search import region_set_search

CONFIG = IndexConfig()


def vectors(seed: int, n: int = 3, dim: int = 8) -> NewVectors:
    raw = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32) + 1.0
    return NewVectors("gem", "global", raw)


def test_store_settings_are_checked_before_anything_opens() -> None:
    with pytest.raises(ConfigError, match="give milvus://HOST:PORT"):
        ServerConfig(store="milvus://nohost")
    with pytest.raises(ConfigError, match="give milvus://HOST:PORT or a milvus-lite file"):
        ServerConfig(store="somewhere")


def test_an_unreachable_store_is_a_start_up_error() -> None:
    with pytest.raises(ConfigError, match=r"cannot reach the Milvus store http://127.0.0.1:1"):
        open_index(Path("unused"), "milvus://127.0.0.1:1", CONFIG, {})


def test_a_store_of_another_format_is_refused(tmp_path: Path) -> None:
    store = str(tmp_path / "m.db")
    index = open_index(tmp_path, store, CONFIG, {})
    index._put_meta("format", json.dumps(STORE_FORMAT + 1))
    index.close()
    with pytest.raises(ConfigError, match=f"written by inserve store format {STORE_FORMAT + 1}; this inserve reads"):
        open_index(tmp_path, store, CONFIG, {})


def test_a_space_whose_collection_has_another_dimension_is_refused(tmp_path: Path) -> None:
    store = str(tmp_path / "m.db")
    index = open_index(tmp_path, store, CONFIG, {})
    index.add_image("a", [vectors(1)], width=1, height=1)
    record = index._record("gem", "global")
    index._save_record("gem", "global", type(record)(**{**record.__dict__, "dim": 16}))
    index.close()
    with pytest.raises(ConfigError, match="holds 8-dimensional vectors; its record in inserve_meta says 16"):
        open_index(tmp_path, store, CONFIG, {})


def replica_of(index: MilvusIndex) -> MilvusIndex:
    """A second replica's view of the same store: the same connection, its own ids."""
    other = MilvusIndex.__new__(MilvusIndex)
    other.__dict__.update(index.__dict__, _ids=SnowflakeIds())
    return other


def test_replicas_creating_one_space_at_once_share_its_collection(tmp_path: Path, monkeypatch) -> None:
    index = open_index(tmp_path, str(tmp_path / "m.db"), CONFIG, {})
    other = replica_of(index)
    record = other._record
    seen = []

    def before_the_first_replica_saved(recipe: str, kind: str):
        seen.append(kind)
        return None if len(seen) <= 2 else record(recipe, kind)  # both reads of _ensure_space

    monkeypatch.setattr(other, "_record", before_the_first_replica_saved)
    first, second = vectors(1), vectors(2)
    index.add_image("first", [first], width=1, height=1)
    other.add_image("second", [second], width=1, height=1)
    for name, raw in (("first", first.raw[0]), ("second", second.raw[1])):
        (row, sim), *_ = index.nearest("gem", "global", index.transform("gem", "global", raw), 1)
        assert index.images([row.image_id])[row.image_id].external_id == name and sim == pytest.approx(1.0, abs=1e-4)
    index.close()


def test_writes_of_another_replica_during_learning_land_in_the_new_collection(tmp_path: Path, monkeypatch) -> None:
    """Replica B writes while A copies the space into its new collection (before A switches) and once more
    after the switch: both images are found under the new transform; one B deletes meanwhile stays deleted."""
    index = open_index(tmp_path, str(tmp_path / "m.db"), CONFIG, {})
    assert isinstance(index, MilvusIndex)
    for i in range(12):
        index.add_image(f"img{i}", [vectors(i)], width=1, height=1)
    other = replica_of(index)
    copy = index._copy
    during = vectors(100)

    def copy_then_interleave(rows, raw, whitening, collection):
        copy(rows, raw, whitening, collection)
        if not other.contains("during"):
            other.add_image("during", [during], width=1, height=1)
            other.delete(["img3"])

    monkeypatch.setattr(index, "_copy", copy_then_interleave)
    assert index.learn_whitening("gem", "global", dims=6) == 1
    after = vectors(101)
    other.add_image("after", [after], width=1, height=1)
    space = index.space("gem", "global")
    assert (space.version, space.dim, len(space)) == (1, 6, 3 * 13)
    for name, raw in (("during", during.raw[0]), ("after", after.raw[2]), ("img5", vectors(5).raw[1])):
        found = index.nearest("gem", "global", index.transform("gem", "global", raw), 1)
        assert index.images([found[0][0].image_id])[found[0][0].image_id].external_id == name
        assert found[0][1] == pytest.approx(1.0, abs=1e-4)
    assert not index.contains("img3")
    assert len(index._client.list_collections()) == 4  # meta, images, videos and the space's new collection
    index.close()


def test_inserve_whiten_learns_the_shared_whitening_of_a_milvus_store(tmp_path: Path) -> None:
    store = str(tmp_path / "m.db")
    index = open_index(tmp_path, store, CONFIG, {})
    for i in range(12):
        index.add_image(f"img{i}", [vectors(i)], width=1, height=1)
    index.close()
    command = [sys.executable, "-m", "inserve.clients.cli", "whiten", "--store", store, "--dims", "6"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "gem/global: whitening v1 from 36 vectors" in done.stdout
    index = open_index(tmp_path, store, CONFIG, {})
    assert [(s.whitening_version, s.dim) for s in index.stats()] == [(1, 6)]
    index.close()


def test_one_replica_learns_for_a_recipe_at_a_time(tmp_path: Path) -> None:
    """A fresh lease of another replica: this one leaves the learning to it (and refuses to save a learned model
    meanwhile); a lease left by a replica that died expires."""
    index = open_index(tmp_path, str(tmp_path / "m.db"), CONFIG, {})
    for i in range(12):
        index.add_image(f"img{i}", [vectors(i)], width=1, height=1)
    collections = sorted(index._client.list_collections())
    index._put_meta("lease/gem", json.dumps({"token": "other", "until": time.time() + 60}))
    assert index.learn_whitening("gem", "global", dims=6) == 0
    assert sorted(index._client.list_collections()) == collections
    with pytest.raises(StoreUnavailable, match="another replica is learning for gem"):
        index.save_learned("gem", "codebook", np.ones(3), "x")
    index._put_meta("lease/gem", json.dumps({"token": "dead", "until": time.time() - 1}))
    assert index.learn_whitening("gem", "global", dims=6) == 1
    assert index._get_meta("lease/gem") is None  # given back
    index.close()


def count_round_trips(client: object) -> list[str]:
    """The names of the client's reads from here on, in order."""
    calls: list[str] = []
    for method in ("search", "query", "get", "query_iterator"):
        original = getattr(client, method)

        def counted(*args, _original=original, _method=method, **kwargs):
            calls.append(_method)
            return _original(*args, **kwargs)

        setattr(client, method, counted)
    return calls


@pytest.mark.parametrize(("query", "most"), [(QUERY, 5), (WHOLE_QUERY, 7)], ids=["box", "whole photo"])
def test_a_region_set_search_takes_few_round_trips_and_finds_what_a_directory_finds(
    tmp_path: Path, query, most: int
) -> None:
    """A default-recipe search on the shared store: each space record read once per search, one search for all
    query vectors, one read of the candidates' rows per space, one of their images (and one of the hits'
    liveness); the same hits as the embedded store."""
    found, calls = {}, []
    for store in ("", str(tmp_path / "milvus.db")):
        index = open_index(tmp_path / "data", store, IndexConfig(auto_whiten_per_dim=0), SET_SPECS)
        try:
            for name, regions in IMAGES.items():
                parts = NewVectors("s", "region", np.array(regions, np.float32), BOXES, np.array([0.5, 0.25, 0]))
                photo = NewVectors("s", "global", np.array([PHOTOS[name]], np.float32))
                index.add_image(name, [parts, photo], width=10, height=10)
            if store:
                calls = count_round_trips(index._client)
            with index.reading():
                hits = region_set_search(index, "s", query, 3, 0.4, 3, "", 0.05, 0.4)
            found[bool(store)] = [(h.image.external_id, round(h.score, 3), np.round(h.box, 2).tolist()) for h in hits]
        finally:
            index.close()
    assert len(calls) <= most, calls
    assert found[True] == found[False]
