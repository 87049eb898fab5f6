"""Recipes built on a detector's boxes: DeepVision (seed 000) and the deep region CNN (seed 002)."""

from __future__ import annotations

import numpy as np

from inserve.server.config import DasrConfig, DetectorConfig, ImageConfig, RegionRecipeConfig
from inserve.server.detector import Detections, Detector
from inserve.server.index import NewVectors, SpaceSpec
from inserve.server.recipes import sources
from inserve.server.recipes.base import (
    FeatureBatch,
    ImageVectors,
    QueryVector,
    Recipe,
    crop_map,
    whole,
    with_whole_fallback,
)
from inserve.server.recipes.crops import crop_batch, embed_crops
from inserve.server.stages.dasr import Regions
from inserve.server.stages.pooling import box_max, l2_normalize, spoc

FUSIONS = ("concat", "mean", "max")
DEEP_REGION_SOURCES = ("detector", "dasr_star")


def detections(batch: FeatureBatch, detector: Detector) -> list[Detections]:
    """The detector's output for every image of the batch (one run per image), computed once."""
    return batch.cached("detections", lambda: [detector.detect(inp.pixels) for inp in batch.inputs])


class DeepVisionRecipe(Recipe):
    """Seed 000 (off-the-shelf, class-agnostic): IPA-sum filtering (sum-pooled `feat`, l2 -> PCA-w -> l2),
    then CA-SR: each of the top N = 100 images scores by its region whose RPA-max (max-pooled `feat`,
    l2 only, no whitening) best matches the query box's, which also localises the instance; QE with M = 5.

    Regions: the detector's RPN proposals when a detector is configured, otherwise DASR* regions; hits say
    which (`region_source`). Features come from the service's backbone, not from the detector."""

    name = "deepvision"
    search_kind = "global"
    rerank_kind = "region"
    default_rerank = 100
    default_query_expansion = 5

    def __init__(self, detector: Detector, config: DetectorConfig, dasr: DasrConfig) -> None:
        self.detector, self.config, self.dasr = detector, config, dasr

    @property
    def region_source(self) -> str:
        return "detector_rpn" if self.detector.configured else "dasr_star"

    @property
    def dasr_peaks(self) -> tuple[str, ...]:
        return () if self.detector.configured else ("dasr_star",)

    def check(self) -> None:
        if self.detector.configured:
            self.detector.check()

    def spaces(self) -> dict[str, SpaceSpec]:
        return {"global": SpaceSpec(), "region": SpaceSpec(whiten=False, searchable=False)}

    def regions(self, batch: FeatureBatch) -> list[Regions]:
        if self.detector.configured:
            top = self.config.proposals
            found = [Regions(d.proposals[:top], d.proposal_scores[:top]) for d in detections(batch, self.detector)]
        else:
            found = sources.dasr(batch, "dasr_star", self.dasr)
        return [with_whole_fallback(inp, r) for inp, r in zip(batch.inputs, found)]

    def describe(self, batch: FeatureBatch) -> list[ImageVectors]:
        stride = batch.stride("feat")
        described = []
        for inp, feat, regions in zip(batch.inputs, batch.maps["feat"], self.regions(batch)):
            boxes = inp.to_original(regions.boxes)
            vectors = [
                NewVectors(self.name, "global", spoc(feat)[None]),
                NewVectors(self.name, "region", box_max(feat, regions.boxes, stride), boxes, regions.scores),
            ]
            described.append(ImageVectors(vectors, Regions(boxes, regions.scores)))
        return described

    def query(self, batch: FeatureBatch, box: np.ndarray | None) -> QueryVector:
        feat = crop_map(batch.maps["feat"][0], box, batch.stride("feat"))
        return QueryVector("global", spoc(feat), rerank=feat.reshape(feat.shape[0], -1).max(axis=1))


class DeepRegionRecipe(Recipe):
    """Seed 002: the top-K (K = 2) detections of an image are cropped (aspect kept, long side crop_long_side)
    and re-embedded with the backbone (GeM of `feat`, l2); the K embeddings are fused by concatenation, mean
    or max into the image's global vector. An image with fewer than K boxes fills in with its whole extent. The query is
    treated like an image: its box (or whole image) is cropped and its own top-K boxes embedded and fused.
    The crop embeddings are also stored as regions, for spatial re-ranking and localisation.

    The seed uses a fine-tuned Faster R-CNN; `deep_region_source = "dasr_star"` uses each image's top-K
    DASR* regions instead, for setups without detector weights."""

    name = "deep_region"
    search_kind = "global"
    rerank_kind = "region"

    def __init__(
        self,
        detector: Detector,
        config: DetectorConfig,
        regions: RegionRecipeConfig,
        dasr: DasrConfig,
        image: ImageConfig,
    ) -> None:
        if regions.deep_region_fusion not in FUSIONS:
            raise ValueError(f"deep_region fusion must be one of {FUSIONS}, got {regions.deep_region_fusion!r}")
        if regions.deep_region_source not in DEEP_REGION_SOURCES:
            raise ValueError(
                f"deep_region source must be one of {DEEP_REGION_SOURCES}, got {regions.deep_region_source!r}"
            )
        self.detector, self.k, self.regions_config, self.dasr, self.image = detector, config.top_k, regions, dasr, image
        self.region_source = regions.deep_region_source
        self.dasr_peaks = ("dasr_star",) if self.region_source == "dasr_star" else ()

    def check(self) -> None:
        if self.region_source == "detector":
            self.detector.check()

    def spaces(self) -> dict[str, SpaceSpec]:
        return {"global": SpaceSpec(), "region": SpaceSpec(searchable=False)}

    def top_boxes(self, batch: FeatureBatch) -> list[Regions]:
        """K boxes per image in network pixels, best first, padded with the whole image."""
        if self.region_source == "detector":
            found = [Regions(d.boxes, d.scores) for d in detections(batch, self.detector)]
        else:
            found = sources.dasr(batch, "dasr_star", self.dasr)
        padded = []
        for inp, regions in zip(batch.inputs, found):
            boxes, scores = regions.boxes[: self.k], regions.scores[: self.k]
            missing = self.k - len(boxes)
            boxes = np.concatenate([boxes, np.repeat(whole(inp)[None], missing, axis=0)]).astype(np.float32)
            scores = np.concatenate([scores, np.zeros(missing, dtype=np.float32)]).astype(np.float32)
            padded.append(Regions(boxes, scores))
        return padded

    def embed(self, batch: FeatureBatch, boxes: list[np.ndarray]) -> list[np.ndarray]:
        """l2-normalised crop embeddings (n_i, C) of each image's boxes, all crops batched through the backbone."""
        config = self.regions_config
        pixels = [inp.pixels for inp in batch.inputs]
        return [
            l2_normalize(v) for v in embed_crops(batch.models, pixels, boxes, config.crop_long_side, config.crop_margin)
        ]

    def fuse(self, embeddings: np.ndarray) -> np.ndarray:
        fusion = self.regions_config.deep_region_fusion
        if fusion == "concat":
            return embeddings.reshape(-1)
        return embeddings.mean(axis=0) if fusion == "mean" else embeddings.max(axis=0)

    def describe(self, batch: FeatureBatch) -> list[ImageVectors]:
        tops = self.top_boxes(batch)
        described = []
        for inp, regions, vectors in zip(batch.inputs, tops, self.embed(batch, [r.boxes for r in tops])):
            boxes = inp.to_original(regions.boxes)
            stored = [
                NewVectors(self.name, "global", self.fuse(vectors)[None]),
                NewVectors(self.name, "region", vectors, boxes, regions.scores),
            ]
            described.append(ImageVectors(stored, Regions(boxes, regions.scores)))
        return described

    def query(self, batch: FeatureBatch, box: np.ndarray | None) -> QueryVector:
        inner = crop_batch(batch, box, self.image.long_side)
        boxes = self.top_boxes(inner)[0].boxes
        vectors = self.embed(inner, [np.concatenate([boxes, whole(inner.inputs[0])[None]])])[0]
        return QueryVector("global", self.fuse(vectors[:-1]), rerank=vectors[-1])
