"""How the index treats each (recipe, kind) vector space: the settings a recipe declares for its spaces."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

Learned = Callable[[str], np.ndarray | None]  # a recipe's learned model by name (e.g. "codebook"), or None


@dataclass(frozen=True)
class Aggregate:
    """A per-image vector derived from the image's vectors in another space of the same recipe (R-MAC, CAM and
    cluster sums, VLAD). It is never stored: it is rebuilt from the parts whenever their whitening or the
    recipe's learned models change, so both can be re-learned without the CNN."""

    source: str  # the kind of the parts
    combine: Callable[[np.ndarray, Learned], np.ndarray | None]  # parts (n, D) -> vector; None = cannot yet
    on_raw: bool = False  # combine the l2-normalised raw parts instead of their whitened form


@dataclass(frozen=True)
class SpaceSpec:
    """How the index treats one (recipe, kind) vector space."""

    whiten: bool = True  # learn PCA-whitening for it (else vectors are only l2-normalised)
    searchable: bool = True  # keep an HNSW graph for first-stage kNN (else it is only read per image)
    whiten_per_image: int | None = None  # learn whitening from at most the first N vectors of each image
    whiten_dims: int | None = None  # overrides IndexConfig.whiten_dims
    whiten_shrinkage: float | None = None  # overrides IndexConfig.whiten_shrinkage
    # keep its raw vectors in int8 and its graph in fewer dims, learned on its own vectors as it grows
    # (IndexConfig.compact_dims, compact_after): a PCA reduction, or with `whiten` PCA-whitening to whiten_dims
    # (else compact_dims); for spaces that would otherwise take most of an image's bytes
    compact: bool = False
    aggregate: Aggregate | None = None


DEFAULT_SPEC = SpaceSpec()
NOT_SEARCHED = "keeps no graph: it is read per image, not searched"  # a space with searchable=False, asked for kNN


def combine_per_image(
    aggregate: Aggregate, parts: np.ndarray, labels: np.ndarray, image_ids: np.ndarray, learned: Learned
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Combine each image's parts (already in the form the aggregate takes): image ids, each image's first
    part label (the aggregate's label) and the aggregate vectors; all empty while one cannot be combined yet
    (a learned model missing)."""
    empty = np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
    ids, first, vectors = [], [], []
    for image_id in np.unique(image_ids):
        members = np.nonzero(image_ids == image_id)[0]
        combined = aggregate.combine(parts[members], learned)
        if combined is None:
            return empty
        ids.append(int(image_id))
        first.append(int(labels[members].min()))
        vectors.append(combined)
    if not vectors:
        return empty
    return np.asarray(ids, np.int64), np.asarray(first, np.int64), np.stack(vectors).astype(np.float32)


@dataclass(frozen=True)
class SpaceStats:
    recipe: str
    kind: str
    vectors: int
    dim: int
    whitening_version: int
