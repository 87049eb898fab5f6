"""Ranking: a first stage over one vector space (images scored by their best match), an optional spatial
re-ranking of the top N by their best-matching region, and optional query expansion (seed 000 section 3.3)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from inserve.server.index import ImageRow, Index, VectorRow
from inserve.server.recipes import QueryVector
from inserve.server.recipes.cam import online_aggregates
from inserve.server.stages.matching import (
    best_region,
    expand_query,
    region_set_scores,
    rerank_order,
    segment_argmax,
    soft_boxes,
    whole_photo_scores,
)

# region-set recipes score in full the top this many images of each query vector's kNN (or top_k, if more)
REGION_SET_DEPTH = 100
KNN_LIMIT = 16_384  # the most neighbours one kNN asks for (Milvus' largest search limit)


@dataclass(frozen=True)
class SearchOptions:
    """None = the recipe's default (seed 000's DeepVision re-ranks the top 100 and expands with 5)."""

    query_expansion: int | None = None  # M: average the query with its top M hits and search again (0 = off)
    rerank_top: int | None = None  # N: re-score the top N images by their best-matching region (0 = off)
    group: str = "none"  # "video": a video's best keyframe only; "shot": each shot's best keyframe only


@dataclass(frozen=True)
class SearchPlan:
    """A search checked once, by InstanceSearch.plan: the recipe by name, top_k and every option resolved
    (the recipe's defaults in place of None). What runs it (InstanceSearch.submit_query, find) checks no more."""

    recipe: str
    top_k: int
    options: SearchOptions


@dataclass(frozen=True)
class Hit:
    image: ImageRow
    score: float
    box: tuple[float, float, float, float] | None  # the matched region, original pixels
    region_score: float
    label: int  # the matched vector
    region_source: str = ""  # where the box came from (a region source name); empty without a box


@dataclass(frozen=True)
class Match:
    image_id: int
    score: float
    row: VectorRow  # the matched vector
    vector: np.ndarray  # the matched vector in the first stage's coordinates (query expansion averages these)
    region: VectorRow | None = None  # the best-matching region after re-ranking
    region_vector: np.ndarray | None = None


def best_per_image(
    index: Index, recipe: str, kind: str, query: np.ndarray, top_k: int
) -> list[tuple[VectorRow, float]]:
    """The best-matching vector of each of the top_k images, asking the graph for more neighbours until
    top_k distinct images are found or the space is exhausted."""
    return best_per_image_each(index, recipe, kind, np.atleast_2d(query), top_k)[0]


def best_per_image_each(
    index: Index, recipe: str, kind: str, queries: np.ndarray, top_k: int, size: int | None = None
) -> list[list[tuple[VectorRow, float]]]:
    """best_per_image for several queries (N, dim): their first kNN in one call to the index (a shared store
    answers them in one search), then each query that found too few images asks again on its own (`size`: the
    space's vectors, when the caller knows)."""
    if size is None:
        space = index.space(recipe, kind)
        size = 0 if space is None else len(space)
    if size == 0:
        return [[] for _ in queries]
    k = min(size, max(4 * top_k, 64))
    found = index.nearest_each(recipe, kind, queries, k)
    results = []
    for query, hits in zip(queries, found):
        ask = k
        while True:
            best: dict[int, tuple[VectorRow, float]] = {}
            for row, sim in hits:
                if row.image_id not in best or sim > best[row.image_id][1]:
                    best[row.image_id] = (row, sim)
            if len(best) >= top_k or ask >= size:
                break
            ask = min(size, 4 * ask)
            hits = index.nearest(recipe, kind, query, ask)
        results.append(sorted(best.values(), key=lambda pair: -pair[1])[:top_k])
    return results


class FirstStage:
    """Ranks images for a query vector in the first stage's coordinates: kNN in the query's space, or, for a
    query with tags, a scan of the images' online aggregates (seed 001 OnA), built once per search."""

    def __init__(self, index: Index, recipe: str, query: QueryVector) -> None:
        self.index, self.recipe, self.kind = index, recipe, query.kind
        self.online = query.tags is not None
        if self.online:
            self.vector, self.ids, self.first, self.vectors = online_aggregates(
                index, recipe, query.kind, query.raw, query.tags
            )
        else:
            self.vector = index.transform(recipe, query.kind, query.raw)

    def rank(self, vector: np.ndarray, top_k: int) -> list[Match]:
        if self.online:
            sims = self.vectors @ vector if len(self.ids) else np.zeros(0)
            order = np.argsort(-sims, kind="stable")[:top_k]
            return [
                Match(
                    int(self.ids[i]),
                    float(sims[i]),
                    VectorRow(int(self.first[i]), int(self.ids[i]), None, 0.0),
                    self.vectors[i],
                )
                for i in order
            ]
        matches = best_per_image(self.index, self.recipe, self.kind, vector, top_k)
        if not matches:
            return []
        stored = self.index.stored(self.recipe, self.kind, [row.label for row, _ in matches])
        return [Match(row.image_id, sim, row, stored[i]) for i, (row, sim) in enumerate(matches)]


def rerank(index: Index, recipe: str, kind: str, query: np.ndarray, matches: list[Match], top: int) -> list[Match]:
    """Seed 000's class-agnostic spatial re-ranking: each of the top images scores by its region (in space
    `kind`) that best matches the query region, which also gives its box; images without regions go last
    among them."""
    head = matches[:top]
    regions = index.image_vectors(recipe, kind, [m.image_id for m in head])
    rescored = []
    for m in head:
        rows, vectors = regions.get(m.image_id, ([], np.zeros((0, len(query)), np.float32)))
        i, sim = best_region(query, vectors)
        rescored.append(
            replace(m, score=-1.0) if i < 0 else replace(m, score=sim, region=rows[i], region_vector=vectors[i])
        )
    order = rerank_order(np.array([m.score for m in matches]), np.array([m.score for m in rescored]), top)
    merged = rescored + matches[top:]
    return [merged[i] for i in order]


def search(
    index: Index,
    recipe: str,
    query: QueryVector,
    top_k: int,
    options: SearchOptions = SearchOptions(),
    rerank_kind: str | None = None,
    region_source: str = "",
) -> list[Hit]:
    """Hits for a query; options must be resolved (no None). Re-ranking needs the recipe's region space
    (`rerank_kind`) and the query's region vector."""
    if index.space(recipe, query.kind) is None:
        return []
    stage = FirstStage(index, recipe, query)
    regions = bool(options.rerank_top) and rerank_kind is not None and query.rerank is not None
    region_query = index.transform(recipe, rerank_kind, query.rerank) if regions else None
    depth = max(top_k, options.rerank_top or 0)

    def ranked(vector: np.ndarray, region_vector: np.ndarray | None) -> list[Match]:
        matches = stage.rank(vector, depth)
        if region_vector is not None and index.space(recipe, rerank_kind) is not None:
            matches = rerank(index, recipe, rerank_kind, region_vector, matches, options.rerank_top)
        return matches

    matches = ranked(stage.vector, region_query)
    if options.query_expansion and matches:
        top = matches[: options.query_expansion]
        vector = expand_query(stage.vector, np.stack([m.vector for m in top]))
        if region_query is not None:
            found = [m.region_vector for m in top if m.region_vector is not None]
            region_query = expand_query(region_query, np.stack(found)) if found else region_query
        matches = ranked(vector, region_query)
    matches = matches[:top_k]
    images = index.images([m.image_id for m in matches])
    hits = []
    for m in matches:
        if m.image_id not in images:
            continue
        row = m.region or m.row
        source = region_source if row.box is not None else ""
        hits.append(Hit(images[m.image_id], m.score, row.box, row.score, row.label, source))
    return hits


def region_set_search(
    index: Index,
    recipe: str,
    query: QueryVector,
    top_k: int,
    set_weight: float,
    depth: int,
    region_source: str = "",
    box_temperature: float = 0.0,
    whole_weight: float = 0.0,
) -> list[Hit]:
    """Hits of a region-set recipe: each image scores `region_set_score` of its regions against the query's crop
    and own regions (`query.regions`: the crop's views first, of which the best match counts, then its own
    regions), or, for a query without a box that carries its photo's vector (`query.whole`), `whole_photo_score`
    of that vector's similarity in the recipe's "global" space (read per candidate, not searched) and those
    regions; the hit's box is `soft_box` of its regions' boxes by their similarity to the crop (its region and
    region score: the best match's). Candidates: the top `depth` images of each query vector's kNN in the region
    space (the crop's finds the photos alike as a whole, by their whole-image regions), every one then scored
    on all of them (an image that only one kNN found still gets every term).

    All candidates are scored at once: one matrix product of the query vectors with every candidate region,
    then per-image reductions over each image's rows (the index keeps them side by side in memory)."""
    space = index.space(recipe, "region")
    if space is None:
        return []
    queries = space.transform(np.stack(query.regions))
    candidates = index.candidates(recipe, "region", top_images(index, recipe, queries, depth))
    if not len(candidates):
        return []
    sims = queries @ candidates.vectors.T
    sims = np.vstack([sims[: query.crop_views].max(axis=0, keepdims=True), sims[query.crop_views :]])
    best = np.maximum.reduceat(sims, candidates.segments, axis=1)  # (query vectors, images)
    scores = region_set_scores(best, set_weight)
    whole = _whole_similarities(index, recipe, query.whole, candidates.image_ids)
    if whole is not None:
        has = ~np.isnan(whole)
        scores[has] = whole_photo_scores(whole[has], best[:, has], whole_weight)
    crop_rows = segment_argmax(sims[0], candidates.offsets)
    boxes = soft_boxes(candidates.boxes.astype(np.float64), sims[0], candidates.offsets, box_temperature)
    order = np.lexsort((candidates.image_ids, -scores))[:top_k]
    images = index.images([int(i) for i in candidates.image_ids[order]])
    return [
        Hit(
            images[int(candidates.image_ids[i])],
            float(scores[i]),
            tuple(float(x) for x in boxes[i]),
            float(candidates.scores[crop_rows[i]]),
            int(candidates.labels[crop_rows[i]]),
            region_source,
        )
        for i in order
        if int(candidates.image_ids[i]) in images
    ]


def top_images(index: Index, recipe: str, queries: np.ndarray, depth: int) -> np.ndarray:
    """The images among the top `depth` of any query's kNN in the recipe's region space (an image ranks by its
    best match), sorted, from one search for all queries; a query whose neighbours hold fewer images asks
    again for more, until the space has no more (fewer neighbours than asked) or KNN_LIMIT."""
    k = max(4 * depth, 64)
    image_ids, _ = index.nearest_images(recipe, "region", queries, k)
    found = []
    for query, ids in zip(queries, image_ids):
        ask = k
        while True:
            ids = ids[ids >= 0]
            firsts = np.sort(np.unique(ids, return_index=True)[1])  # each image at its best match, best first
            if len(firsts) >= depth or len(ids) < ask or ask >= KNN_LIMIT:
                break
            ask = min(KNN_LIMIT, 4 * ask)
            ids = index.nearest_images(recipe, "region", query[None], ask)[0][0]
        found.append(ids[firsts[:depth]])
    return np.unique(np.concatenate(found)) if found else np.zeros(0, np.int64)


def _whole_similarities(
    index: Index, recipe: str, whole: np.ndarray | None, image_ids: np.ndarray
) -> np.ndarray | None:
    """Per candidate image, its photo's similarity to a whole-photo query's (`whole`; None, a query with a box:
    None); NaN for images without a photo vector (indexed before the recipe had the space), which score as for
    a query with a box."""
    space = None if whole is None else index.space(recipe, "global")
    if space is None:
        return None
    vector = space.transform(whole[None])[0]
    stored = index.candidates(recipe, "global", image_ids)
    found = np.full(len(image_ids), np.nan, dtype=np.float32)
    found[np.searchsorted(image_ids, stored.image_ids)] = stored.vectors[stored.offsets[:-1]] @ vector
    return found
