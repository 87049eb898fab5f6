"""The same images and queries through two real servers, one on a data directory (hnswlib + SQLite), one on a
Milvus store (a milvus-lite file): the same hits, scores and boxes, for the default recipe (regions read per
image, a compact region space), gem and rmac (a per-image aggregate of region parts), with and without a box;
deletes and stats alike."""

from __future__ import annotations

from pathlib import Path

import pytest
from photos import encode, photo
from servers import running_server

from inserve.clients.client import ImageItem, InstanceSearchClient

NAMES = ("astronaut", "chelsea", "coffee", "rocket", "camera", "motorcycle")
QUERIES = [(name, None) for name in NAMES[:3]] + [("astronaut", (150, 20, 330, 220)), ("coffee", (180, 40, 460, 330))]
RECIPES = ("whole_and_regions", "gem", "rmac")
FLAGS = ("--recipe", ",".join(RECIPES))


def answers(client: InstanceSearchClient) -> dict:
    """Every query's hits per recipe: (id, score, box to a pixel)."""
    found = {}
    for recipe in RECIPES:
        for name, box in QUERIES:
            hits = client.search(encode(photo(name)), box=box, recipe=recipe, top_k=4)
            found[(recipe, name, box)] = [
                (h.id, h.score, tuple(round(c) for c in (h.box.x1, h.box.y1, h.box.x2, h.box.y2))) for h in hits
            ]
    return found


def run(models: Path, data_dir: Path, *store: str) -> tuple[dict, dict, tuple]:
    with (
        running_server(models, data_dir, *FLAGS, *store) as server,
        InstanceSearchClient(server.address, timeout=300) as client,
    ):
        client.wait_ready()
        acks = list(client.index_images(ImageItem(n, encode(photo(n)), source=f"{n}.jpg") for n in NAMES))
        assert [a.id for a in acks] == list(NAMES)
        before = answers(client)
        assert client.delete(["chelsea", "nope"]).deleted == 1
        after = answers(client)
        stats = client.stats()
        counts = (stats.images, sorted((s.recipe, s.kind, s.vectors, s.dim) for s in stats.indexes))
    return before, after, counts


def test_both_stores_give_the_same_hits_and_boxes(models_dir: Path, tmp_path: Path) -> None:
    directory = run(models_dir, tmp_path / "data")
    milvus = run(models_dir, tmp_path / "unused", "--store", str(tmp_path / "milvus.db"))
    for ours, theirs in zip(milvus[:2], directory[:2]):
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert [i for i, _, _ in ours[key]] == [i for i, _, _ in theirs[key]], key
            # the directory scores candidates from float16 copies of their vectors (its scoring table), Milvus
            # from float32: a hit's box, a softmax over its regions' similarities, may move across a pixel's
            # rounding
            for (_, _, box), (_, _, other) in zip(ours[key], theirs[key]):
                assert box == pytest.approx(other, abs=1), key
            # whole_and_regions' photo vectors, which keep no graph, are read from their int8 raw in the directory
            # and float32 from Milvus: int8's cosine error (codec.py, ~1.5e-4) x the photo weight, at most
            assert [s for _, s, _ in ours[key]] == pytest.approx([s for _, s, _ in theirs[key]], abs=5e-4), key
    assert milvus[2] == directory[2]
    before, after, (images, _) = directory
    assert images == 5
    assert before[("gem", "astronaut", None)][0][0] == "astronaut"
    assert all(hit[0] != "chelsea" for hits in after.values() for hit in hits)
