"""Stopping the server and starting it on the same data directory gives back everything indexed."""

from __future__ import annotations

from pathlib import Path

from photos import encode, photo
from servers import running_server

from inserve.clients.client import ImageItem, InstanceSearchClient

NAMES = ("astronaut", "chelsea", "coffee", "rocket")


def hits_of(address: str) -> list[tuple]:
    with InstanceSearchClient(address, timeout=300) as client:
        client.wait_ready()
        found = []
        for recipe in ("dasr_star", "gem"):
            hits = client.search(encode(photo("chelsea")), box=(100, 30, 330, 290), top_k=4, recipe=recipe)
            found.append(
                [
                    (h.id, round(h.score, 4), h.HasField("box") and (h.box.x1, h.box.y1, h.box.x2, h.box.y2))
                    for h in hits
                ]
            )
        stats = client.stats()
        found.append((stats.images, stats.regions, sorted((s.recipe, s.kind, s.vectors) for s in stats.indexes)))
        return found


def test_a_restarted_server_gives_the_same_hits(models_dir: Path, tmp_path: Path) -> None:
    flags = ("--recipe", "dasr_star,gem")
    with running_server(models_dir, tmp_path, *flags) as server:
        with InstanceSearchClient(server.address, timeout=300) as client:
            client.wait_ready()
            list(client.index_images(ImageItem(name, encode(photo(name))) for name in NAMES))
        before = hits_of(server.address)
    assert server.process.returncode == 0
    with running_server(models_dir, tmp_path, *flags) as server:
        after = hits_of(server.address)
    assert before[-1][0] == len(NAMES)
    assert after == before


def test_vectors_indexed_after_the_last_snapshot_come_back_from_sqlite(models_dir: Path, tmp_path: Path) -> None:
    """Graph snapshots are written at shutdown; a server killed before that rebuilds from SQLite."""
    with running_server(models_dir, tmp_path, "--recipe", "gem") as server:
        with InstanceSearchClient(server.address, timeout=300) as client:
            client.wait_ready()
            list(client.index_images(ImageItem(name, encode(photo(name))) for name in NAMES))
        server.process.kill()
        server.process.wait()
    with (
        running_server(models_dir, tmp_path, "--recipe", "gem") as server,
        InstanceSearchClient(server.address, timeout=300) as client,
    ):
        assert client.stats().images == len(NAMES)
        for name in NAMES:
            assert client.search(encode(photo(name)), top_k=1)[0].id == name


def default_recipe_hits(client: InstanceSearchClient) -> list[list[tuple]]:
    """The default recipe's hits (ids, scores, boxes) for a query with a box and a whole photo."""
    found = []
    for name, box in (("chelsea", (100, 30, 330, 290)), ("astronaut", None)):
        hits = client.search(encode(photo(name)), box=box, top_k=5)
        found.append([(h.id, round(h.score, 4), (h.box.x1, h.box.y1, h.box.x2, h.box.y2)) for h in hits])
    return found


def test_vectors_in_memory_after_a_crash_are_those_the_store_holds(models_dir: Path, tmp_path: Path) -> None:
    """The default recipe scores candidates from vectors it keeps in memory (the scoring table), built up write
    by write while serving and rebuilt from SQLite at start-up. A server killed right after a commit, before
    any query saw it, restarts with the same answers as the one that wrote them: here the last image written
    before the kill is deleted again, and the hits are those of before it."""
    with (
        running_server(models_dir, tmp_path) as server,
        InstanceSearchClient(server.address, timeout=300) as client,
    ):
        client.wait_ready()
        list(client.index_images(ImageItem(name, encode(photo(name))) for name in (*NAMES, "camera")))
        list(client.index_images([ImageItem("coffee", encode(photo("coins")), replace=True)]))
        client.delete(["camera"])
        before = default_recipe_hits(client)
        list(client.index_images([ImageItem("late", encode(photo("chelsea")))]))  # committed and acknowledged
        server.process.kill()
        server.process.wait()
    with (
        running_server(models_dir, tmp_path) as server,
        InstanceSearchClient(server.address, timeout=300) as client,
    ):
        client.wait_ready()
        assert client.delete(["late"]).deleted == 1
        assert default_recipe_hits(client) == before
