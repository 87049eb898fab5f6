"""Region sources (DESIGN.md stage 2): boxes with scores in network pixels, computed once per batch."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from inserve.server.config import ClustersConfig, DasrConfig
from inserve.server.models import ModelBundle
from inserve.server.recipes.base import FeatureBatch
from inserve.server.stages.components import threshold_boxes
from inserve.server.stages.dasr import DasrEngines, Regions, dasr_region_sets
from inserve.server.stages.ncut import colour_clusters, feature_clusters
from inserve.server.stages.pooling import masks_to_boxes
from inserve.server.stages.rmac import cells_to_boxes, rmac_grid
from inserve.server.stages.weighting import normalize_maps


def dasr_key(peaks: str, config: DasrConfig) -> str:
    """Where a batch keeps its DASR regions (the quality bench fills it from its own cache)."""
    return f"regions:{peaks}:{config}"


def dasr(batch: FeatureBatch, peaks: str, config: DasrConfig) -> list[Regions]:
    """DASR (`peaks` = "dasr") or DASR* ("dasr_star") regions of every image (seed 004); the first call also
    finds the other kinds the batch's recipes need (`batch.dasr_peaks`), in the same back-propagation."""
    key = dasr_key(peaks, config)
    if key not in batch.derived:
        stride = stop_stride(batch.models, config)
        kinds = tuple(sorted({peaks, *batch.dasr_peaks}))
        moments = batch.maps["moments"] if batch.moments_stride == stride else None
        engines = dasr_engines(batch.models, config)
        found = dasr_region_sets(engines, stride, batch.pixels, batch.maps["feat"], batch.sizes, kinds, config, moments)
        for kind, regions in found.items():
            batch.derived.setdefault(dasr_key(kind, config), regions)
    return batch.derived[key]


def stop_stride(models: ModelBundle, config: DasrConfig) -> int:
    """Where the DASR graphs stop: the configured stride, else the export's default."""
    return config.stop_stride or models.default_stop_stride


def dasr_engines(models: ModelBundle, config: DasrConfig) -> DasrEngines:
    """The DASR graphs the region mode runs, opened (ModelsError when the export lacks one: the server calls this
    at start, so that an old export is refused then, with what to do, not at the first image)."""
    stride = stop_stride(models, config)
    return DasrEngines(
        models.backprop(stride) if config.mode != "adjoint" else None,
        models.moments(stride) if config.mode != "exact" else None,
    )


def rmac(height: int, width: int, stride: int, levels: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """The R-MAC grid of a height x width map: cell ranges (N, 4) and their boxes in input pixels."""
    cells = rmac_grid(height, width, levels)
    return cells, cells_to_boxes(cells, stride, width * stride, height * stride)


def cam_boxes(batch: FeatureBatch, classes: int, thresholds: Sequence[float]) -> list[Regions]:
    """Seed 001's localisation: the mean [0, 1]-scaled CAM of each image's top `classes` classes, thresholded
    at fractions of its maximum; the box of the largest connected component per threshold. Scores = the
    threshold's fraction (a tighter box has a higher one)."""
    stride = batch.stride("feat")

    def compute() -> list[Regions]:
        found = []
        for cams in batch.cams():
            heat = normalize_maps(cams["cams"][:classes]).mean(axis=0)
            boxes = threshold_boxes(heat, thresholds, stride)
            found.append(Regions(boxes, np.asarray(thresholds[: len(boxes)], dtype=np.float32)))
        return found

    return batch.cached(f"cam_boxes:{classes}:{tuple(thresholds)}", compute)


def clusters(batch: FeatureBatch, config: ClustersConfig) -> list[tuple[np.ndarray, np.ndarray]]:
    """Seed 003's clusters of every image: masks (n, h, w) over the `feat` cells and their bounding boxes."""
    stride = batch.stride("feat")
    return batch.cached(
        f"clusters:{config}",
        lambda: [cluster_masks(f, inp.pixels, config, stride) for f, inp in zip(batch.maps["feat"], batch.inputs)],
    )


def cluster_masks(
    feat: np.ndarray, pixels: np.ndarray, config: ClustersConfig, stride: int
) -> tuple[np.ndarray, np.ndarray]:
    """Feature clusters (one normalized cut per configured count) and colour clusters of one map; empty
    clusters dropped. Returns masks (n, h, w) and boxes (n, 4) in the map's input pixels."""
    shape = feat.shape[1:]
    masks = [feature_clusters(feat, config.pca_dims, config.feature_clusters)]
    if config.colour_clusters:
        masks.append(colour_clusters(pixels, shape, config.colour_clusters))
    masks = np.concatenate(masks)
    masks = masks[masks.reshape(len(masks), -1).any(axis=1)]
    return masks, masks_to_boxes(masks, stride)
