"""Ranking: nearest vectors of the query's space, images scored by their best match, query expansion."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from inserve.server.index import ImageRow, InstanceIndex, VectorRow
from inserve.server.recipes import QueryVector
from inserve.server.stages.pooling import l2_normalize

GROUPINGS = ("none", "video", "shot")


@dataclass(frozen=True)
class SearchOptions:
    query_expansion: int = 0  # M: average the query with its top M hits and search again (0 = off)
    group: str = "none"  # "video": a video's best keyframe only; "shot": each shot's best keyframe only


@dataclass(frozen=True)
class Hit:
    image: ImageRow
    score: float
    box: tuple[float, float, float, float] | None  # the matched region, original pixels
    region_score: float
    label: int  # the matched vector


def best_per_image(
    index: InstanceIndex, recipe: str, kind: str, query: np.ndarray, top_k: int
) -> list[tuple[VectorRow, float]]:
    """The best-matching vector of each of the top_k images, asking the graph for more neighbours until
    top_k distinct images are found or the space is exhausted."""
    space = index.space(recipe, kind)
    if space is None or len(space) == 0:
        return []
    k = min(len(space), max(4 * top_k, 64))
    while True:
        best: dict[int, tuple[VectorRow, float]] = {}
        for row, sim in index.nearest(recipe, kind, query, k):
            if row.image_id not in best or sim > best[row.image_id][1]:
                best[row.image_id] = (row, sim)
        if len(best) >= top_k or k >= len(space):
            break
        k = min(len(space), 4 * k)
    return sorted(best.values(), key=lambda pair: -pair[1])[:top_k]


def search(
    index: InstanceIndex, recipe: str, query: QueryVector, top_k: int, options: SearchOptions = SearchOptions()
) -> list[Hit]:
    space = index.space(recipe, query.kind)
    if space is None:
        return []
    transformed = space.transform(query.raw)[0]
    matches = best_per_image(index, recipe, query.kind, transformed, top_k)
    if options.query_expansion > 0 and matches:
        top = [row.label for row, _ in matches[: options.query_expansion]]
        raw = index.store.raw_vectors(top)
        expanded = transformed + space.transform(np.stack([raw[label] for label in top])).sum(axis=0)
        matches = best_per_image(index, recipe, query.kind, l2_normalize(expanded), top_k)
    images = index.images([row.image_id for row, _ in matches])
    return [
        Hit(images[row.image_id], sim, row.box, row.score, row.label) for row, sim in matches if row.image_id in images
    ]
