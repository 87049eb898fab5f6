"""Seed 004: DASR / DASR* regions described by the average of `desc` inside each box; and DASR*+VLAD."""

from __future__ import annotations

import numpy as np

from inserve.server.config import DasrConfig, ImageConfig, RegionRecipeConfig
from inserve.server.index import Aggregate, Learned, NewVectors, SpaceSpec
from inserve.server.recipes import sources
from inserve.server.recipes.base import FeatureBatch, ImageVectors, QueryVector, Recipe, whole, with_whole_fallback
from inserve.server.recipes.crops import crop_batch
from inserve.server.stages.dasr import Regions
from inserve.server.stages.pooling import box_average
from inserve.server.stages.vlad import vlad

CODEBOOK = "codebook"


class DasrRecipe(Recipe):
    """Instance-level search: an image scores by its best-matching region. An image where no region is
    found is indexed with one region covering it whole, so that it can still be found."""

    search_kind = "region"
    rerank_kind = "region"

    def __init__(self, name: str, peaks: str, config: DasrConfig) -> None:
        self.name, self.peaks, self.config = name, peaks, config
        self.region_source = peaks

    def region_vectors(self, batch: FeatureBatch) -> list[tuple[np.ndarray, Regions]]:
        """Per image: descriptors (n, C) and regions in network pixels."""
        stride = batch.stride("desc")
        found = []
        for inp, desc, regions in zip(batch.inputs, batch.maps["desc"], sources.dasr(batch, self.peaks, self.config)):
            regions = with_whole_fallback(inp, regions)
            found.append((box_average(desc, regions.boxes, stride), regions))
        return found

    def describe(self, batch: FeatureBatch) -> list[ImageVectors]:
        described = []
        for inp, (vectors, regions) in zip(batch.inputs, self.region_vectors(batch)):
            boxes = inp.to_original(regions.boxes)
            described.append(
                ImageVectors(
                    [NewVectors(self.name, "region", vectors, boxes, regions.scores)], Regions(boxes, regions.scores)
                )
            )
        return described

    def query(self, batch: FeatureBatch, box: np.ndarray | None) -> QueryVector:
        box = whole(batch.inputs[0]) if box is None else box
        vector = box_average(batch.maps["desc"][0], box[None], batch.stride("desc"))[0]
        return QueryVector("region", vector, rerank=vector)


class DasrVladRecipe(DasrRecipe):
    """Image-level search (seed 004 section IV-D): VLAD with a k = 4 codebook over an image's DASR* region
    descriptors (l2-normalised), power-law 0.5, then PCA-whitened. The regions are stored (not searched) and
    the VLAD vectors are rebuilt from them, so the codebook, learned on other data (`inserve
    learn-codebook`) and versioned in the index, can change without the CNN. A query's regions are its own
    DASR* regions (inside the query box)."""

    name = "dasr_star_vlad"
    search_kind = "global"
    learned_models = (CODEBOOK,)

    def __init__(self, config: DasrConfig, regions: RegionRecipeConfig, image: ImageConfig) -> None:
        super().__init__(self.name, "dasr_star", config)
        self.alpha, self.k, self.image = regions.vlad_alpha, regions.vlad_k, image

    def spaces(self) -> dict[str, SpaceSpec]:
        return {
            "region": SpaceSpec(searchable=False),
            "global": SpaceSpec(aggregate=Aggregate("region", self.combine, on_raw=True)),
        }

    def combine(self, parts: np.ndarray, learned: Learned) -> np.ndarray | None:
        codebook = learned(CODEBOOK)
        return None if codebook is None else vlad(parts, codebook, self.alpha)

    def query(self, batch: FeatureBatch, box: np.ndarray | None) -> QueryVector:
        region = box_average(
            batch.maps["desc"][0], (whole(batch.inputs[0]) if box is None else box)[None], batch.stride("desc")
        )[0]
        inner = batch if box is None else crop_batch(batch, box, self.image.long_side)
        parts, _ = self.region_vectors(inner)[0]
        return QueryVector("global", parts, rerank=region)
