"""Second-stage maths of a search: best-matching region per image (spatial re-ranking) and query expansion."""

from __future__ import annotations

import numpy as np

from inserve.server.stages.pooling import l2_normalize


def best_region(query: np.ndarray, regions: np.ndarray) -> tuple[int, float]:
    """Index and cosine similarity of the region (rows of l2-normalised `regions`) that best matches `query`;
    (-1, -inf) when there are none."""
    if len(regions) == 0:
        return -1, float("-inf")
    sims = regions @ query
    best = int(np.argmax(sims))
    return best, float(sims[best])


def region_set_score(sims: np.ndarray, set_weight: float) -> tuple[float, int]:
    """An image's score from the cosines (m, n) of a query's crop (row 0) and its own regions (the other rows)
    with the image's n regions: `set_weight` x the mean of the query regions' best matches + the rest x the
    crop's best match (the crop's alone when the query has no regions of its own); and the region that best
    matches the crop (the hit's box). Both terms are cosines in one space, so they add on one scale."""
    best = sims.max(axis=1)
    crop = int(np.argmax(sims[0]))
    if len(best) == 1:
        return float(best[0]), crop
    return float(set_weight * _own_regions(best) + (1.0 - set_weight) * best[0]), crop


def _own_regions(best: np.ndarray) -> float:
    """The mean of the query's own regions' best matches (`best`: the crop's first), or, when it has none, the
    crop's."""
    return float(best[1:].mean() if len(best) > 1 else best[0])


def whole_photo_score(whole: float, sims: np.ndarray, whole_weight: float) -> float:
    """An image's score for a query without a box (a whole photo): `whole_weight` x the photos' similarity +
    the rest x the mean of the query's own regions' best matches (`sims` as in `region_set_score`; its crop's
    best match when it has no regions of its own). The crop's single best match, which finds small instances,
    is left out: for a whole photo it ranks scenes that merely contain one of its objects (bench/README.md, "One
    default recipe")."""
    return float(whole_weight * whole + (1.0 - whole_weight) * _own_regions(sims.max(axis=1)))


def soft_box(boxes: np.ndarray, sims: np.ndarray, temperature: float) -> np.ndarray:
    """The mean of an image's region boxes (n, 4) weighted by softmax(sims / temperature): the regions that match
    the query almost as well as the best pull its box toward where they agree (the best region alone is
    often off-centre, bench/README "One default recipe"); temperature 0 = the best region's box."""
    if temperature <= 0:
        return boxes[int(np.argmax(sims))]
    weights = np.exp((sims - sims.max()) / temperature)
    return (boxes * weights[:, None]).sum(axis=0) / weights.sum()


def rerank_order(first: np.ndarray, second: np.ndarray, top: int) -> np.ndarray:
    """Order of a ranking after re-scoring its first `top` entries with `second` (best first, stable); the
    rest keep their order behind them (seed 000's spatial re-ranking of the top N)."""
    top = min(top, len(first))
    head = np.argsort(-np.asarray(second[:top], dtype=np.float64), kind="stable")
    return np.concatenate([head, np.arange(top, len(first))]).astype(np.int64)


def expand_query(query: np.ndarray, neighbours: np.ndarray) -> np.ndarray:
    """Average query expansion: l2(query + sum of the top-M neighbours), all l2-normalised vectors."""
    neighbours = np.asarray(neighbours, dtype=np.float32).reshape(-1, len(query))
    return l2_normalize(np.asarray(query, dtype=np.float32) + neighbours.sum(axis=0))


def sum_normalized(parts: np.ndarray) -> np.ndarray:
    """R-MAC-style aggregation: l2(sum of the l2-normalised parts); zeros when there are none."""
    parts = np.asarray(parts, dtype=np.float32)
    if len(parts) == 0:
        return np.zeros(parts.shape[-1], dtype=np.float32)
    return l2_normalize(l2_normalize(parts).sum(axis=0))
