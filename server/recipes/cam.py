"""Seed 001: class-weighted convolutional features (CAM x CroW channel weights, sum-pooled per class)."""

from __future__ import annotations

import numpy as np

from inserve.server.config import CamConfig
from inserve.server.index import Aggregate, Index, NewVectors, SpaceSpec
from inserve.server.recipes import sources
from inserve.server.recipes.base import FeatureBatch, ImageVectors, QueryVector, Recipe, crop_map
from inserve.server.stages.dasr import Regions
from inserve.server.stages.matching import sum_normalized
from inserve.server.stages.pooling import box_average, l2_normalize
from inserve.server.stages.weighting import cam_class_vectors, crow_channel_weights

CAM_MODES = ("offline", "online")


class CamRecipe(Recipe):
    """Each image stores its top-N_C class vectors F^c (kind "class", tagged with the class id, not searched)
    and up to five CAM boxes (kind "region", for re-ranking). The searchable "global" vector is
    l2(sum over classes of l2 -> PCA-w -> l2 of F^c), the class whitening learned from each image's first
    N_pca class vectors.

    Offline (OfA) compares those per-image sums. Online (OnA) sums, for the query and for every image, only
    the class vectors of the query's top-N_C classes, at search time, by a scan over the stored class vectors:
    storage is N_C vectors per image (the paper's alternative, CAMs of all 1000 classes per image, costs
    30x more), and a query class outside an image's own top N_C contributes nothing for that image.
    """

    name = "cam"
    search_kind = "global"
    rerank_kind = "region"
    region_source = "cam"

    def __init__(self, config: CamConfig) -> None:
        if config.mode not in CAM_MODES:
            raise ValueError(f"cam mode must be one of {CAM_MODES}, got {config.mode!r}")
        self.config = config

    def spaces(self) -> dict[str, SpaceSpec]:
        classes = self.config.classes
        return {
            "class": SpaceSpec(searchable=False, whiten_per_image=self.config.pca_classes),
            "global": SpaceSpec(
                whiten=False, aggregate=Aggregate("class", lambda parts, _: sum_normalized(parts[:classes]))
            ),
            "region": SpaceSpec(searchable=False),
        }

    def describe(self, batch: FeatureBatch) -> list[ImageVectors]:
        cams = batch.cams()
        n = self.config.classes
        boxes_of = sources.cam_boxes(batch, self.config.rerank_classes, self.config.thresholds)
        stride = batch.stride("feat")
        described = []
        for i, inp in enumerate(batch.inputs):
            feat = batch.maps["feat"][i]
            classes = NewVectors(
                self.name,
                "class",
                cam_class_vectors(feat, cams[i]["cams"][:n]),
                scores=cams[i]["scores"][:n],
                tags=cams[i]["classes"][:n],
            )
            regions = boxes_of[i]
            boxes = inp.to_original(regions.boxes)
            region_vectors = crow_channel_weights(feat) * box_average(feat, regions.boxes, stride)
            described.append(
                ImageVectors(
                    [classes, NewVectors(self.name, "region", region_vectors, boxes, regions.scores)],
                    Regions(boxes, regions.scores),
                )
            )
        return described

    def query(self, batch: FeatureBatch, box: np.ndarray | None) -> QueryVector:
        """The query's top-N_C classes come from the whole query image; the box crops the map and the CAMs."""
        cams = batch.cams()
        n = self.config.classes
        stride = batch.stride("feat")
        feat = crop_map(batch.maps["feat"][0], box, stride)
        parts = cam_class_vectors(feat, crop_map(cams[0]["cams"][:n], box, stride))
        region = crow_channel_weights(feat) * feat.reshape(feat.shape[0], -1).mean(axis=1)
        tags = cams[0]["classes"][:n] if self.config.mode == "online" else None
        return QueryVector("global", parts, rerank=region, tags=tags)


def online_aggregates(
    index: Index, recipe: str, kind: str, parts: np.ndarray, tags: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Online aggregation (seed 001 OnA): the aggregate `kind` built from only the parts whose tag is one of
    `tags`, for the query (`parts` (n, D) raw) and for every image holding such parts.

    Returns the query's vector, and image ids, first-part labels and vectors (N, D') of the images; all
    l2-normalised, compared by dot product. Costs a pass over the matching parts (no graph).
    """
    aggregate = index.spec(recipe, kind).aggregate
    if aggregate is None:
        raise ValueError(f"{recipe}/{kind} is not an aggregate")
    combined = index.combine(recipe, aggregate, np.atleast_2d(parts))
    query = l2_normalize(np.zeros(0) if combined is None else combined)
    labels, image_ids, _, raw = index.tagged_vectors(recipe, aggregate.source, tags)
    ids, first, vectors = index.combine_groups(recipe, aggregate, labels, image_ids, raw)
    return query, ids, first, l2_normalize(vectors)
