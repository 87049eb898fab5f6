"""Search with spatial re-ranking and query expansion over hand-made vectors (no CNN, no whitening)."""

from pathlib import Path

import numpy as np

from inserve.server.config import IndexConfig
from inserve.server.index import InstanceIndex, NewVectors, SpaceSpec
from inserve.server.recipes import QueryVector
from inserve.server.search import SearchOptions, search

# the scoring maths by hand: vectors kept in memory at full precision (float16 is the storage test's)
EXACT = IndexConfig(auto_whiten_per_dim=0, scoring_precision="float32")

SPECS = {("x", "global"): SpaceSpec(whiten=False), ("x", "region"): SpaceSpec(whiten=False, searchable=False)}


def _v(*values: float) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)[None]


def _index(tmp_path: Path) -> InstanceIndex:
    """Globals: a and b close to the query direction (1, 0, 0, 0), c farther, d orthogonal to the query but
    close to a. Regions: c holds the best match for the region query (0, 0, 0, 1), at box (5, 5, 9, 9)."""
    index = InstanceIndex(tmp_path, EXACT, SPECS)
    images = {
        "a": (_v(1, 0.1, 0, 0), [_v(0, 1, 0, 0)]),
        "b": (_v(1, 0, 0.3, 0), [_v(0, 0, 1, 0)]),
        "c": (_v(1, 0, 0, 0.6), [_v(0, 1, 0, 0), _v(0, 0.1, 0, 1)]),
        "d": (_v(0.2, 1, 0, 0), [_v(1, 0, 0, 0)]),
    }
    for name, (g, regions) in images.items():
        boxes = np.array([[0, 0, 4, 4], [5, 5, 9, 9]][: len(regions)], dtype=np.float32)
        index.add_image(
            name,
            [
                NewVectors("x", "global", g),
                NewVectors("x", "region", np.concatenate(regions), boxes, np.arange(len(regions), dtype=np.float32)),
            ],
            width=10,
            height=10,
        )
    return index


QUERY = QueryVector("global", np.array([1, 0, 0, 0], np.float32), rerank=np.array([0, 0, 0, 1], np.float32))


def _names(hits: list) -> list[str]:
    return [h.image.external_id for h in hits]


def test_first_stage_only(tmp_path: Path) -> None:
    index = _index(tmp_path)
    hits = search(index, "x", QUERY, 4, SearchOptions(0, 0), "region", "test")
    assert _names(hits) == ["a", "b", "c", "d"]
    assert all(h.box is None and h.region_source == "" for h in hits)
    index.close()


def test_rerank_rescores_the_top_n_by_best_region_and_gives_its_box(tmp_path: Path) -> None:
    index = _index(tmp_path)
    hits = search(index, "x", QUERY, 4, SearchOptions(0, 3), "region", "test")
    assert _names(hits) == ["c", "a", "b", "d"]  # c's second region matches; a and b tie at 0 (stable)
    assert hits[0].box == (5.0, 5.0, 9.0, 9.0) and hits[0].region_source == "test" and hits[0].region_score == 1.0
    np.testing.assert_allclose(hits[0].score, 1 / np.sqrt(1.01), rtol=1e-5)
    assert hits[3].box is None  # beyond the top N: first-stage hit, no region
    hits = search(index, "x", QUERY, 4, SearchOptions(0, 1), "region", "test")
    assert _names(hits) == ["a", "b", "c", "d"]  # re-ranking one image changes no order
    index.close()


def test_query_expansion_pulls_in_neighbours_of_the_top_hits(tmp_path: Path) -> None:
    index = _index(tmp_path)
    plain = search(index, "x", QUERY, 4, SearchOptions(0, 0))
    expanded = search(index, "x", QUERY, 4, SearchOptions(1, 0))
    # q + a = (2, 0.1, 0, 0) normalised: still a first; d (0.2, 1) gains on c and b?
    q = np.array([1, 0, 0, 0]) + np.array([1, 0.1, 0, 0]) / np.linalg.norm([1, 0.1, 0, 0])
    q /= np.linalg.norm(q)
    expected = {
        name: float(q @ (g / np.linalg.norm(g)))
        for name, g in {"a": [1, 0.1, 0, 0], "b": [1, 0, 0.3, 0], "c": [1, 0, 0, 0.6], "d": [0.2, 1, 0, 0]}.items()
    }
    assert _names(expanded) == sorted(expected, key=lambda n: -expected[n])
    for hit in expanded:
        np.testing.assert_allclose(hit.score, expected[hit.image.external_id], rtol=1e-5)
    assert [h.score for h in plain] != [h.score for h in expanded]
    index.close()


def test_query_expansion_after_rerank_expands_both_queries(tmp_path: Path) -> None:
    index = _index(tmp_path)
    hits = search(index, "x", QUERY, 4, SearchOptions(1, 4), "region", "test")
    # re-ranked: c (0.995), then a, b, d tied at 0; the region query expanded with c's region (0, .1, 0, 1)
    # gains a y component, so a's region (0, 1, 0, 0) now beats b's and d's (still 0), which keep the
    # first-stage order of the expanded global query: b (0.92) before d (0.19)
    assert _names(hits) == ["c", "a", "b", "d"]
    assert hits[0].box == (5.0, 5.0, 9.0, 9.0)
    region_query = np.array([0, 0, 0, 1]) + np.array([0, 0.1, 0, 1]) / np.sqrt(1.01)
    np.testing.assert_allclose(hits[1].score, region_query[1] / np.linalg.norm(region_query), rtol=1e-5)
    index.close()
