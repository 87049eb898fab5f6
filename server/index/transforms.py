"""The whitening policy, in one place: which spaces learn a transform (PCA-whitening, or a compact space's PCA
reduction), from which vectors, when it is learned again, and the one loop that learns them, run by the
service as its index grows, by `inserve whiten` and by evaluation alike.

The index applies a space's transform (VectorSpace, server/index/vectors.py) and keeps its versions (SQLite);
learning one rebuilds the space's graph or collection (Index.learn_whitening).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from inserve.server.config import IndexConfig
from inserve.server.index.spaces import SpaceSpec
from inserve.server.stages.whitening import Whitening, pca_reduce, pca_whiten

if TYPE_CHECKING:
    from inserve.server.index.protocol import Index

COMPACT_RELEARN_LIMIT = 64  # a compact space stops re-learning once learned from this many x compact_after


def compact(spec: SpaceSpec, config: IndexConfig) -> bool:
    """A compact space: its graph holds fewer dims (a PCA reduction, or whitening to fewer dims), SQLite its raw
    vectors in int8, and the service learns its transform as it grows (`ready`, `due`)."""
    return spec.compact and config.compact_dims > 0


def learns(spec: SpaceSpec, config: IndexConfig) -> bool:
    """True when the space learns a transform from its vectors: PCA-whitening, or a compact space's PCA
    reduction. Whitening lifts global descriptors and lowered every region recipe (bench/quality.md), which is
    why region spaces set `whiten=False` and reduce only when compact, and whole_and_regions whitens its whole
    photos' space only."""
    return spec.whiten or compact(spec, config)


def training_vectors(spec: SpaceSpec, image_ids: np.ndarray, raw: np.ndarray) -> np.ndarray:
    """The raw vectors (label order) a transform learns from: all, or the first SpaceSpec.whiten_per_image of
    each image."""
    if spec.whiten_per_image is None or len(image_ids) == 0:
        return raw
    starts = {int(i): int(np.argmax(image_ids == i)) for i in np.unique(image_ids)}
    rank = np.arange(len(image_ids)) - np.array([starts[int(i)] for i in image_ids])
    return raw[rank < spec.whiten_per_image]


def learn_transform(spec: SpaceSpec, config: IndexConfig, training: np.ndarray, dims: int | None) -> Whitening:
    """The transform a space learns from its training vectors: PCA-whitening (with the space's own dims and
    shrinkage where it sets them; a compact space's to IndexConfig.compact_dims unless it sets its own), or, for
    a compact space that does not whiten, a PCA reduction to compact_dims."""
    if len(training) < 2:
        raise ValueError(f"the space holds {len(training)} vectors; whitening needs more")
    if compact(spec, config) and not spec.whiten:
        return pca_reduce(training, dims or config.compact_dims)
    default_dims = config.compact_dims if compact(spec, config) else config.whiten_dims
    shrinkage = config.whiten_shrinkage if spec.whiten_shrinkage is None else spec.whiten_shrinkage
    return pca_whiten(training, dims or spec.whiten_dims or default_dims, shrinkage=shrinkage)


def any_vectors(index: Index, recipe: str, kind: str) -> bool:
    """Selects every space that learns and holds at least two vectors (`inserve whiten`, evaluation)."""
    space = index.space(recipe, kind)
    return learns(index.spec(recipe, kind), index.config) and space is not None and len(space) >= 2


def ready(index: Index, recipe: str, kind: str) -> bool:
    """Selects the spaces that hold enough vectors to learn their transform: per dimension
    (IndexConfig.auto_whiten_per_dim) for whitening, IndexConfig.compact_after for a compact space."""
    space = index.space(recipe, kind)
    spec = index.spec(recipe, kind)
    if space is not None and compact(spec, index.config):
        return len(space) >= index.config.compact_after
    per_dim = index.config.auto_whiten_per_dim
    if space is None or not spec.whiten or per_dim <= 0:
        return False
    samples = len(space)
    if spec.whiten_per_image is not None:
        samples = min(samples, spec.whiten_per_image * index.count_images())
    return samples >= per_dim * space.raw_dim


def due(index: Index, recipe: str, kind: str) -> bool:
    """Selects a space that was never whitened and now can be; a compact space also each time it has doubled
    since its reduction was learned, until that was learned from 64 x compact_after vectors: a reduction
    learned on the first images keeps the directions of what they show, and later images may need others
    (one learned on another dev set lost 0.11 mAP on composite-dev). Re-learning rebuilds the graph, so
    doubling keeps its cost to at most two insertions per vector."""
    space = index.space(recipe, kind)
    if space is None or not ready(index, recipe, kind):
        return False
    if not compact(index.spec(recipe, kind), index.config):
        return space.version == 0
    learned_from = index.learned_from(recipe, kind)
    return len(space) >= 2 * learned_from and learned_from < COMPACT_RELEARN_LIMIT * index.config.compact_after


Selection = Callable[["Index", str, str], bool]


def learn_transforms(
    index: Index, select: Selection, recipe: str | None = None, dims: int | None = None
) -> dict[tuple[str, str], int]:
    """Learn the transform of every space `select` picks (of one recipe, or all), parts before aggregates:
    an aggregate is rebuilt on its parts' new transform. Returns each learned space's new version."""
    spaces = sorted(index.stats(), key=lambda s: index.spec(s.recipe, s.kind).aggregate is not None)
    return {
        (s.recipe, s.kind): index.learn_whitening(s.recipe, s.kind, dims)
        for s in spaces
        if recipe in (None, s.recipe) and select(index, s.recipe, s.kind)
    }
