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


def region_set_scores(best: np.ndarray, set_weight: float) -> np.ndarray:
    """Images' scores from `best` (m, n): the best cosine of each query vector (rows: the query's crop first, then
    its own regions) among each of n images' regions: `set_weight` x the mean of the query regions' best matches
    + the rest x the crop's best match (the crop's alone when the query has no regions of its own). Both terms
    are cosines in one space, so they add on one scale."""
    if len(best) == 1:
        return best[0].copy()
    return set_weight * _own_regions(best) + (1.0 - set_weight) * best[0]


def _own_regions(best: np.ndarray) -> np.ndarray:
    """Per image, the mean of the query's own regions' best matches (`best`: the crop's row first), or, when it
    has none, the crop's."""
    return best[1:].mean(axis=0) if len(best) > 1 else best[0]


def whole_photo_scores(whole: np.ndarray, best: np.ndarray, whole_weight: float) -> np.ndarray:
    """Images' scores for a query without a box (a whole photo): `whole_weight` x the photos' similarity (n,) +
    the rest x the mean of the query's own regions' best matches (`best` as in `region_set_scores`; its crop's
    when it has no regions of its own). The crop's single best match, which finds small instances, is left out:
    for a whole photo it ranks scenes that merely contain one of its objects (bench/README.md, "One default
    recipe")."""
    return whole_weight * whole + (1.0 - whole_weight) * _own_regions(best)


def segment_argmax(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """The index of the first largest of values[offsets[i]:offsets[i + 1]] for each non-empty segment i."""
    maxima = np.maximum.reduceat(values, offsets[:-1])
    at_max = np.flatnonzero(values == np.repeat(maxima, np.diff(offsets)))
    segment = np.searchsorted(offsets, at_max, side="right") - 1
    return at_max[np.unique(segment, return_index=True)[1]]


def soft_boxes(boxes: np.ndarray, sims: np.ndarray, offsets: np.ndarray, temperature: float) -> np.ndarray:
    """Per image (its regions rows offsets[i]:offsets[i + 1]), the mean of its region boxes (R, 4) weighted by
    softmax(sims / temperature): the regions that match the query almost as well as the best pull its box toward
    where they agree (the best region alone is often off-centre, bench/README "One default recipe"); temperature
    0 = the best region's box."""
    if temperature <= 0:
        return boxes[segment_argmax(sims, offsets)]
    starts = offsets[:-1]
    weights = np.exp((sims - np.repeat(np.maximum.reduceat(sims, starts), np.diff(offsets))) / temperature)
    return np.add.reduceat(boxes * weights[:, None], starts, axis=0) / np.add.reduceat(weights, starts)[:, None]


def region_set_score(sims: np.ndarray, set_weight: float) -> tuple[float, int]:
    """`region_set_scores` of one image from the cosines (m, n) of the query vectors with its n regions, and
    the region that best matches the crop (the hit's box)."""
    return float(region_set_scores(sims.max(axis=1, keepdims=True), set_weight)[0]), int(np.argmax(sims[0]))


def whole_photo_score(whole: float, sims: np.ndarray, whole_weight: float) -> float:
    """`whole_photo_scores` of one image, from the cosines (m, n) of the query vectors with its n regions."""
    return float(whole_photo_scores(np.array([whole]), sims.max(axis=1, keepdims=True), whole_weight)[0])


def soft_box(boxes: np.ndarray, sims: np.ndarray, temperature: float) -> np.ndarray:
    """`soft_boxes` of one image's regions."""
    return soft_boxes(boxes, sims, np.array([0, len(sims)]), temperature)[0]


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
