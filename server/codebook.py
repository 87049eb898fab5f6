"""The VLAD codebook of dasr_star_vlad, learned on other data than the index it serves (seed 004: "the
vocabulary is trained on an independent dataset"): from another data directory's stored region vectors, or
from a folder of images described with the same recipe."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from inserve.server.index import Index, InstanceIndex
from inserve.server.index.data_dir import INDEX_FILE
from inserve.server.recipes.dasr import CODEBOOK
from inserve.server.stages.pooling import l2_normalize
from inserve.server.stages.vlad import kmeans

RECIPE = "dasr_star_vlad"
SOURCE_RECIPES = (RECIPE, "dasr_star")  # both store the same DASR* region descriptors


def vectors_from_index(data_dir: Path) -> np.ndarray:
    """Region vectors of another data directory (dasr_star_vlad's, else dasr_star's); raw, (N, D)."""
    if not (Path(data_dir) / INDEX_FILE).is_file():
        raise FileNotFoundError(f"{data_dir} holds no index ({INDEX_FILE})")
    index = InstanceIndex(data_dir)
    try:
        for recipe in SOURCE_RECIPES:
            raw = index.raw_vectors(recipe, "region")
            if len(raw):
                return raw
    finally:
        index.close()
    raise ValueError(f"{data_dir} holds no region vectors of {' or '.join(SOURCE_RECIPES)}")


def vectors_from_images(
    describe: Callable[[list[bytes]], list[np.ndarray]], paths: Iterable[Path], batch: int = 8
) -> np.ndarray:
    """Region vectors of images, `describe` mapping a batch of encoded images to their region vectors."""
    paths = list(paths)
    found: list[np.ndarray] = []
    for start in range(0, len(paths), batch):
        found += describe([p.read_bytes() for p in paths[start : start + batch]])
    if not found:
        raise ValueError("no images to learn a codebook from")
    return np.concatenate(found)


def learn_codebook(vectors: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """k-means centroids (k, D) of l2-normalised region vectors (VLAD encodes l2-normalised descriptors)."""
    return kmeans(l2_normalize(vectors), k, seed=seed)


def save_codebook(index: Index, centroids: np.ndarray, source: str) -> int:
    """Store a new codebook version; the VLAD vectors are rebuilt from the stored regions. Returns the version."""
    return index.save_learned(RECIPE, CODEBOOK, centroids, source)
