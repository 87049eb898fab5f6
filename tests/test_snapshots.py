"""HNSW snapshot files: one pair per vector space, never loaded when graph and sidecar disagree, written on
schedule; SQLite fills in whatever a snapshot lacks."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_index_store import crash

from inserve.server.config import IndexConfig
from inserve.server.index import InstanceIndex, MetadataStore, NewVectors

DIM = 8
CONFIG = IndexConfig(auto_whiten_per_dim=0)


def vectors(recipe: str, kind: str, seed: int, n: int = 3) -> NewVectors:
    raw = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return NewVectors(recipe, kind, raw)


def add(index: InstanceIndex, name: str, seed: int) -> tuple[NewVectors, NewVectors]:
    """An image with a global vector and three region vectors of the same recipe and dimension."""
    whole, regions = vectors("r", "global", seed, 1), vectors("r", "region", seed + 1000)
    index.add_image(name, [whole, regions], width=64, height=64)
    return whole, regions


def nearest_id(index: InstanceIndex, kind: str, raw: np.ndarray) -> tuple[str, float]:
    space = index.space("r", kind)
    row, sim = index.nearest("r", kind, space.transform(raw)[0], 1)[0]
    return index.images([row.image_id])[row.image_id].external_id, sim


def graph_labels(index: InstanceIndex, kind: str) -> list[int]:
    """Labels the space's graph serves (deleted ones left out), each once."""
    graph = index.space("r", kind)._graph
    live = []
    for label in graph.get_ids_list():
        try:
            graph.get_items([label])
        except RuntimeError:  # marked deleted
            continue
        live.append(int(label))
    return sorted(live)


def assert_matches_sqlite(index: InstanceIndex) -> None:
    for kind in ("global", "region"):
        assert graph_labels(index, kind) == sorted(int(v) for v in index.store.labels("r", kind))
        assert len(index.space("r", kind)) == index.store.count_vectors("r", kind)


def opened(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> tuple[InstanceIndex, str]:
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="inserve.server.index"):
        index = InstanceIndex(tmp_path, CONFIG)
    return index, caplog.text


def test_two_kinds_of_one_recipe_keep_their_own_snapshots(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    index = InstanceIndex(tmp_path, CONFIG)
    added = {f"img{i}": add(index, f"img{i}", i) for i in range(4)}
    index.close()
    assert sorted(p.name for p in (tmp_path / "graphs").iterdir()) == [
        "r.global.hnsw",
        "r.global.json",
        "r.region.hnsw",
        "r.region.json",
    ]
    reopened, log = opened(tmp_path, caplog)
    try:
        assert "rebuilt" not in log and log.count("(snapshot, 0 caught up from SQLite)") == 2
        for name, (whole, regions) in added.items():
            assert nearest_id(reopened, "global", whole.raw[0]) == (name, pytest.approx(1.0, abs=1e-5))
            assert nearest_id(reopened, "region", regions.raw[2]) == (name, pytest.approx(1.0, abs=1e-5))
        assert_matches_sqlite(reopened)
    finally:
        reopened.close()


def test_a_graph_newer_than_its_sidecar_is_not_loaded(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A crash between the graph's rename and the sidecar's leaves a new graph beside an old sidecar."""
    index = InstanceIndex(tmp_path, CONFIG)
    add(index, "a", 1)
    index.snapshot()
    old_sidecar = (tmp_path / "graphs" / "r.region.json").read_text()
    later = add(index, "b", 2)
    index.delete(["a"])
    index.snapshot()
    crash(index)
    (tmp_path / "graphs" / "r.region.json").write_text(old_sidecar)
    reopened, log = opened(tmp_path, caplog)
    try:
        assert "r.region.hnsw does not match its sidecar" in log and "r/region: 3 vectors (rebuilt" in log
        assert "r/global: 1 vectors (snapshot, 0 caught up" in log
        assert nearest_id(reopened, "region", later[1].raw[0])[0] == "b"
        assert_matches_sqlite(reopened)
    finally:
        reopened.close()


def test_a_damaged_graph_file_is_rebuilt_from_sqlite(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    index = InstanceIndex(tmp_path, CONFIG)
    added = [add(index, f"img{i}", i) for i in range(3)]
    index.close()
    graph = tmp_path / "graphs" / "r.global.hnsw"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    reopened, log = opened(tmp_path, caplog)
    try:
        assert "r.global.hnsw does not match its sidecar" in log and "r/global: 3 vectors (rebuilt" in log
        assert nearest_id(reopened, "global", added[1][0].raw[0])[0] == "img1"
        assert_matches_sqlite(reopened)
    finally:
        reopened.close()


def test_a_save_cut_short_leaves_nothing_behind(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    index = InstanceIndex(tmp_path, CONFIG)
    add(index, "a", 1)
    index.close()
    graphs = tmp_path / "graphs"
    shutil.copy(graphs / "r.global.hnsw", graphs / "r.global.hnsw.tmp")
    (graphs / "r.global.json.tmp").write_text('{"max_label": 99')
    reopened, log = opened(tmp_path, caplog)
    try:
        assert "(snapshot, 0 caught up from SQLite)" in log
        assert not list(graphs.glob("*.tmp"))
        assert_matches_sqlite(reopened)
    finally:
        reopened.close()


def test_snapshots_are_written_every_n_vectors(tmp_path: Path) -> None:
    index = InstanceIndex(tmp_path, IndexConfig(auto_whiten_per_dim=0, snapshot_every=6))
    try:
        add(index, "a", 1)  # 4 vectors: not yet
        assert not (tmp_path / "graphs").exists()
        add(index, "b", 2)  # 8 >= 6: both spaces saved, as SQLite holds them now
        sidecar = json.loads((tmp_path / "graphs" / "r.region.json").read_text())
        assert sidecar["max_label"] == max(index.store.labels("r", "region")) and sidecar["live"] == 6
        add(index, "c", 3)  # 4 since the last snapshot: not yet
        assert json.loads((tmp_path / "graphs" / "r.region.json").read_text()) == sidecar
    finally:
        index.close()


def test_a_snapshot_lacking_what_another_writer_stored_is_rebuilt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two processes on one directory (before the lock, or a copy put back): the graph snapshot holds only
    what its own process added, below a max_label that covers the other's writes. It passes its size and CRC
    checks but disagrees with SQLite: caught at start-up and rebuilt, not trusted."""
    index = InstanceIndex(tmp_path, CONFIG)
    add(index, "a", 1)
    other = MetadataStore(tmp_path / "index.sqlite")  # the other writer: its rows reach SQLite, not this graph
    theirs = vectors("r", "region", 7)
    other.add_image("b", "", 64, 64, {}, [vectors("r", "global", 6, 1), theirs])
    other.close()
    add(index, "c", 3)  # labels above the other writer's
    index.close()
    reopened, log = opened(tmp_path, caplog)
    try:
        assert "r/region: the snapshot lacks 3 vectors that SQLite holds" in log
        assert "r/global: the snapshot lacks 1 vectors that SQLite holds" in log
        assert nearest_id(reopened, "region", theirs.raw[0])[0] == "b"
        assert_matches_sqlite(reopened)
    finally:
        reopened.close()
