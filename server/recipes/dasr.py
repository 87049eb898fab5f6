"""Seed 004: DASR / DASR* regions described by the average of `desc` inside each box; DASR*+VLAD; and DASR*
regions cropped and re-embedded."""

from __future__ import annotations

import numpy as np

from inserve.server.config import DasrConfig, ImageConfig, RegionRecipeConfig
from inserve.server.index import Aggregate, Learned, NewVectors, SpaceSpec
from inserve.server.recipes import sources
from inserve.server.recipes.base import FeatureBatch, ImageVectors, QueryVector, Recipe, whole, with_whole_fallback
from inserve.server.recipes.crops import crop_batch, embed_crops
from inserve.server.stages.dasr import Regions
from inserve.server.stages.pooling import box_average, l2_normalize
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
        self.dasr_peaks = (peaks,)

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
        inner = crop_batch(batch, box, self.image.long_side)
        parts, _ = self.region_vectors(inner)[0]
        return QueryVector("global", parts, rerank=region)


class DasrCropsRecipe(Recipe):
    """DASR* regions, plus one covering the whole image, each cropped out of the image and re-embedded with the
    backbone (the crop-and-re-embed stage of seed 002; GeM of `feat`), instead of pooling `desc` inside the box.
    Instance-level search as dasr_star: an image scores by its best-matching region.

    Why: on composite-dev (small instances in clutter) a box pooled from the image's own maps carries the
    clutter around it in through the receptive field; even the ground-truth boxes pooled that way reach
    0.19-0.26 mAP, their crops 0.95. The query is its box (or the whole image) embedded the same way.

    No PCA-whitening: learned on the index's own region vectors it lowered composite-dev mAP at every setting
    measured (all dims 0.815 -> 0.664; 256 dims 0.804; shrinkage 0.05 0.802), so vectors are l2-normalised only.
    """

    name = "dasr_star_crops"
    search_kind = "region"
    rerank_kind = "region"
    region_source = "dasr_star"
    dasr_peaks = ("dasr_star",)

    def __init__(self, config: DasrConfig, regions: RegionRecipeConfig) -> None:
        self.config, self.regions = config, regions

    def spaces(self) -> dict[str, SpaceSpec]:
        return {"region": SpaceSpec(whiten=False)}

    def describe(self, batch: FeatureBatch) -> list[ImageVectors]:
        found = sources.dasr(batch, "dasr_star", self.config)
        regions = [
            Regions(
                np.concatenate([r.boxes.reshape(-1, 4), whole(inp)[None]]).astype(np.float32),
                np.concatenate([r.scores, np.zeros(1)]).astype(np.float32),
            )
            for inp, r in zip(batch.inputs, found)
        ]
        vectors = self.embed(batch, [r.boxes for r in regions])
        described = []
        for inp, r, v in zip(batch.inputs, regions, vectors):
            boxes = inp.to_original(r.boxes)
            described.append(
                ImageVectors([NewVectors(self.name, "region", v, boxes, r.scores)], Regions(boxes, r.scores))
            )
        return described

    def embed(self, batch: FeatureBatch, boxes: list[np.ndarray]) -> list[np.ndarray]:
        pixels = [inp.pixels for inp in batch.inputs]
        return embed_crops(batch.models, pixels, boxes, self.regions.crop_long_side, self.regions.crop_margin)

    def query(self, batch: FeatureBatch, box: np.ndarray | None) -> QueryVector:
        box = whole(batch.inputs[0]) if box is None else box
        vector = l2_normalize(self.embed(batch, [box[None]])[0][0])
        return QueryVector("region", vector, rerank=vector)
