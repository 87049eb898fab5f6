"""Global descriptors pooled from the last conv map: MAC, SPoC, GeM, CroW, and the region-sum ones, R-MAC
(grid regions) and seed 003's clusters, whose parts are whitened one by one before they are summed."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from inserve.server.config import ClustersConfig
from inserve.server.index import Aggregate, NewVectors, SpaceSpec
from inserve.server.recipes import sources
from inserve.server.recipes.base import FeatureBatch, ImageVectors, QueryVector, Recipe, crop_map
from inserve.server.stages.dasr import Regions
from inserve.server.stages.matching import sum_normalized
from inserve.server.stages.pooling import box_cells, cells_max, masked_max


class GlobalPoolingRecipe(Recipe):
    """One vector per image, pooled from `feat`; a query box pools the cells it covers (crop X)."""

    search_kind = "global"

    def __init__(self, name: str, pool: Callable[[np.ndarray], np.ndarray]) -> None:
        self.name, self.pool = name, pool

    def describe(self, batch: FeatureBatch) -> list[ImageVectors]:
        return [
            ImageVectors([NewVectors(self.name, "global", self.pool(feat)[None])], Regions.empty())
            for feat in batch.maps["feat"]
        ]

    def query(self, batch: FeatureBatch, box: np.ndarray | None) -> QueryVector:
        return QueryVector("global", self.pool(crop_map(batch.maps["feat"][0], box, batch.stride("feat"))))


def _sum_parts(parts: np.ndarray, learned: object) -> np.ndarray:
    return sum_normalized(parts)


class RegionSumRecipe(Recipe):
    """Regional MACs stored as whitened, non-searchable "region" parts (they also serve spatial re-ranking);
    the searchable "global" vector is l2(sum of the l2 -> PCA-w -> l2 parts), rebuilt when the parts'
    whitening is re-learned. Subclasses say which regions."""

    search_kind = "global"
    rerank_kind = "region"

    def spaces(self) -> dict[str, SpaceSpec]:
        return {
            "region": SpaceSpec(searchable=False),
            "global": SpaceSpec(whiten=False, aggregate=Aggregate("region", _sum_parts)),
        }

    def parts(self, feat: np.ndarray, pixels: np.ndarray, stride: int) -> tuple[np.ndarray, np.ndarray]:
        """Part vectors (n, C) of a map and their boxes (n, 4) in the map's input pixels."""
        raise NotImplementedError

    def image_parts(self, batch: FeatureBatch, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.parts(batch.maps["feat"][i], batch.inputs[i].pixels, batch.stride("feat"))

    def describe(self, batch: FeatureBatch) -> list[ImageVectors]:
        described = []
        for i, inp in enumerate(batch.inputs):
            vectors, boxes = self.image_parts(batch, i)
            boxes = inp.to_original(boxes)
            scores = np.zeros(len(boxes), dtype=np.float32)
            described.append(
                ImageVectors([NewVectors(self.name, "region", vectors, boxes, scores)], Regions(boxes, scores))
            )
        return described

    def query(self, batch: FeatureBatch, box: np.ndarray | None) -> QueryVector:
        stride = batch.stride("feat")
        feat = batch.maps["feat"][0]
        x0, y0, x1, y1 = (
            (0, 0, feat.shape[2], feat.shape[1]) if box is None else box_cells(box, stride, *feat.shape[1:])[0]
        )
        feat = feat[:, y0:y1, x0:x1]
        pixels = batch.inputs[0].pixels[:, y0 * stride : y1 * stride, x0 * stride : x1 * stride]
        vectors, _ = self.parts(feat, pixels, stride)
        return QueryVector("global", vectors, rerank=feat.reshape(feat.shape[0], -1).max(axis=1))


class RmacRecipe(RegionSumRecipe):
    """R-MAC (Tolias et al.): MACs of the 3-scale overlapping square grid, whitened, summed."""

    name = "rmac"
    region_source = "rmac_grid"

    def parts(self, feat: np.ndarray, pixels: np.ndarray, stride: int) -> tuple[np.ndarray, np.ndarray]:
        cells, boxes = sources.rmac(feat.shape[1], feat.shape[2], stride)
        return cells_max(feat, cells), boxes


class ClustersRecipe(RegionSumRecipe):
    """Seed 003: MACs of normalized-cut clusters of feature locations (5 + 20) and of colours (5)."""

    name = "clusters"
    region_source = "clusters"

    def __init__(self, config: ClustersConfig) -> None:
        self.config = config

    def parts(self, feat: np.ndarray, pixels: np.ndarray, stride: int) -> tuple[np.ndarray, np.ndarray]:
        masks, boxes = sources.cluster_masks(feat, pixels, self.config, stride)
        return masked_max(feat, masks), boxes

    def image_parts(self, batch: FeatureBatch, i: int) -> tuple[np.ndarray, np.ndarray]:
        masks, boxes = sources.clusters(batch, self.config)[i]
        return masked_max(batch.maps["feat"][i], masks), boxes
