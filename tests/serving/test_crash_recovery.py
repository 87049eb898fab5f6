"""Durability under kill -9: the real server is SIGKILLed in the middle of a long IndexImages stream, after
deletes and after a video; each restart on the same data directory must serve every acknowledged image and
keyframe exactly once, none of the deleted ones, from files that open cleanly."""

from __future__ import annotations

import json
import re
import sqlite3
import zlib
from pathlib import Path

import grpc
import hnswlib
import pytest
from media import scenes_video
from photos import distinct_photo, encode
from servers import Server, running_server
from skimage import data

from inserve.clients.client import ImageItem, InstanceSearchClient, VideoItem

FLAGS = ("--recipe", "gem", "--snapshot-every", "8")  # snapshots every 8 vectors: several before the kill
LOGS = ("--log-level", "INFO")
STREAM = 400  # images offered on the stream; it is killed long before its end
KILL_AFTER = 30  # acknowledgements


def name(i: int) -> str:
    return f"img{i:03d}"


def kill(server: Server) -> None:
    server.process.kill()  # SIGKILL: no snapshot, no cleanup
    server.process.wait()


def all_hits(client: InstanceSearchClient) -> list[str]:
    """Every image id the gem index returns (top_k above the number indexed)."""
    return [hit.id for hit in client.search(distinct_photo(0), top_k=1000)]


def loaded_from_snapshot(server: Server) -> re.Match:
    found = re.search(
        r"gem/global: (\d+) vectors \((snapshot|rebuilt), (\d+) caught up from SQLite\)", "".join(server.output)
    )
    assert found, "".join(server.output)
    return found


def crc(path: Path) -> int:
    return zlib.crc32(path.read_bytes())


def live_labels(graph: hnswlib.Index) -> set[int]:
    """Labels a loaded graph serves: those not marked deleted (get_items refuses deleted ones)."""
    live = set()
    for label in graph.get_ids_list():
        try:
            graph.get_items([label])
        except RuntimeError:
            continue
        live.add(int(label))
    return live


def check_files(data_dir: Path, exact: bool = False) -> None:
    """The files as a crash (or a stop) left them: SQLite passes its integrity check, the graph snapshot
    matches its sidecar and loads, and serves only labels SQLite committed (after a crash SQLite may hold
    more, and fewer when deletes came after the snapshot; after a clean stop exactly the same)."""
    db = sqlite3.connect(data_dir / "index.sqlite")
    try:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        committed = {row[0] for row in db.execute("SELECT label FROM vectors WHERE recipe = 'gem'")}
        highest = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'vectors'").fetchone()[0]
    finally:
        db.close()
    sidecar = json.loads((data_dir / "graphs" / "gem.global.json").read_text())
    graph_file = data_dir / "graphs" / "gem.global.hnsw"
    assert (graph_file.stat().st_size, crc(graph_file)) == (sidecar["graph_bytes"], sidecar["graph_crc32"])
    graph = hnswlib.Index(space="ip", dim=sidecar["dim"])
    graph.load_index(str(graph_file))
    assert max(graph.get_ids_list()) == sidecar["max_label"] <= highest
    live = live_labels(graph)
    assert len(live) == sidecar["live"]
    if exact:
        assert live == committed
    else:  # every committed label is in the snapshot, or after it (start catches those up from SQLite)
        assert not {label for label in committed if label not in live and label <= sidecar["max_label"]}


def test_acknowledged_images_deletes_and_keyframes_survive_sigkill(models_dir: Path, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    acked: list[str] = []
    with (
        running_server(models_dir, data_dir, *FLAGS) as server,
        InstanceSearchClient(server.address, timeout=300) as client,
    ):
        client.wait_ready()
        stream = client.index_images(ImageItem(name(i), distinct_photo(i)) for i in range(STREAM))
        with pytest.raises(grpc.RpcError) as cut:
            for ack in stream:
                acked.append(ack.id)
                if len(acked) == KILL_AFTER:
                    kill(server)
    assert cut.value.code() == grpc.StatusCode.UNAVAILABLE
    assert acked == [name(i) for i in range(KILL_AFTER)]
    check_files(data_dir)

    with (
        running_server(models_dir, data_dir, *FLAGS, global_flags=LOGS) as server,
        InstanceSearchClient(server.address, timeout=300) as client,
    ):
        stats = client.stats()
        committed = stats.images  # acknowledged, and maybe a few more the server stored as the ack left
        assert KILL_AFTER <= committed < KILL_AFTER + 16
        ids = all_hits(client)
        assert sorted(ids) == [name(i) for i in range(committed)]  # every one once, no gap
        assert stats.indexes[0].vectors == committed
        for i in (0, KILL_AFTER // 2, KILL_AFTER - 1):  # the last acknowledged one included
            top = client.search(distinct_photo(i), top_k=1)[0]
            assert top.id == name(i) and top.score == pytest.approx(1.0, abs=1e-4)
        found = loaded_from_snapshot(server)
        assert found.group(2) == "snapshot" and int(found.group(1)) == committed
        assert int(found.group(3)) <= 8  # the last snapshot (every 8) lacks at most 8: a kill may land before it
        gone = [name(i) for i in range(10)]
        assert client.delete(gone).deleted == 10
        kill(server)
    check_files(data_dir)

    with (
        running_server(models_dir, data_dir, *FLAGS, global_flags=LOGS) as server,
        InstanceSearchClient(server.address, timeout=300) as client,
    ):
        assert client.stats().images == committed - 10
        assert sorted(all_hits(client)) == [name(i) for i in range(10, committed)]
        assert loaded_from_snapshot(server).group(2) == "snapshot"  # the deleted were in it: reconciled
        clip = scenes_video(tmp_path / "clip.mp4", [data.astronaut(), data.coffee()], seconds_each=1)
        progress = list(client.index_video(VideoItem("clip", file=clip)))
        assert progress[-1].done and progress[-1].keyframes_indexed >= 2
        kill(server)
    with (
        running_server(models_dir, data_dir, *FLAGS) as server,
        InstanceSearchClient(server.address, timeout=300) as client,
    ):
        stats = client.stats()
        assert (stats.videos, stats.keyframes) == (1, progress[-1].keyframes_indexed)
        assert stats.images == committed - 10 + stats.keyframes
        ids = all_hits(client)
        assert len(ids) == len(set(ids)) == stats.images
        assert client.search(encode(data.coffee()), top_k=1)[0].keyframe.video_id == "clip"
    assert server.process.returncode == 0
    check_files(data_dir, exact=True)  # the snapshot SIGTERM wrote holds exactly what SQLite holds
    sidecar = json.loads((data_dir / "graphs" / "gem.global.json").read_text())
    assert sidecar["live"] == stats.images
