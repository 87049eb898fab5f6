"""DASR and DASR* region sources: peaks of the mean activation map, back-propagated by the exported graph."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from inserve.engines import Engine
from inserve.server.config import DasrConfig
from inserve.server.stages.buckets import valid_cells
from inserve.server.stages.nms import nms
from inserve.server.stages.peaks import above_mean, local_maxima, mean_activation
from inserve.server.stages.shapes import map_boxes

PEAK_FINDERS = {"dasr": local_maxima, "dasr_star": above_mean}


@dataclass(frozen=True)
class Regions:
    """Boxes (N, 4) in network-input pixels, best first, with their peak activation as score."""

    boxes: np.ndarray
    scores: np.ndarray

    @staticmethod
    def empty() -> Regions:
        return Regions(np.zeros((0, 4), dtype=np.float32), np.zeros(0, dtype=np.float32))


def seed_runs(counts: list[int], per_run: int) -> list[tuple[list[int], int, int]]:
    """How to back-propagate the seeds of a batch's images (counts[i] seeds each) in engine runs of at most
    `per_run` seed rows: (images in the run, first seed, seed slots per image) for each run.

    The graph recomputes the forward pass of every image in a run, so an image should take part in as few
    runs as when it runs alone: each image gets min(per_run, its count) slots or more per run. Images are
    taken by seed count, most first; a group shares runs while (group size) x (its first image's slots)
    rows fit, and an image leaves the group's runs once its seeds are done.
    """
    order = sorted((i for i, n in enumerate(counts) if n > 0), key=lambda i: -counts[i])
    runs = []
    while order:
        most = counts[order[0]]
        width = min(per_run, most)
        group, order = order[: max(1, per_run // width)], order[max(1, per_run // width) :]
        for start in range(0, most, width):
            runs.append(([i for i in group if counts[i] > start], start, min(width, most - start)))
    return runs


def backpropagate_seeds(engine: Engine, pixels: np.ndarray, seeds: list[np.ndarray], per_run: int) -> list[np.ndarray]:
    """Probability maps (n_b, h, w) for each image's seeds (n_b, 2), in the runs `seed_runs` plans.

    Images with fewer seeds than a run's slots fill them with zero-valued seeds, whose maps are dropped;
    every seed's map depends on its own image and position only, so it is the same in any run.
    """
    maps: list[list[np.ndarray]] = [[] for _ in seeds]
    for images, start, slots in seed_runs([len(s) for s in seeds], per_run):
        yx = np.zeros((len(images), slots, 2), dtype=np.int64)
        value = np.zeros((len(images), slots), dtype=np.float32)
        for row, b in enumerate(images):
            chunk = seeds[b][start : start + slots]
            yx[row, : len(chunk)] = chunk
            value[row, : len(chunk)] = 1.0
        out = engine.run({"image": pixels[images], "seed_yx": yx, "seed_value": value}, ["maps"])["maps"]
        for row, b in enumerate(images):
            maps[b].append(out[row, : min(slots, len(seeds[b]) - start)])
    return [np.concatenate(m) if m else np.zeros((0, 1, 1), dtype=np.float32) for m in maps]


def seed_maps(
    engine: Engine, pixels: np.ndarray, feat: list[np.ndarray], peaks: str, per_run: int
) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Mean activation map, peak positions (n, 2) and their probability maps (n, h, w) of each image."""
    activations = [mean_activation(f) for f in feat]
    seeds = [PEAK_FINDERS[peaks](a) for a in activations]
    return activations, seeds, backpropagate_seeds(engine, pixels, seeds, per_run)


def regions_from_maps(
    activation: np.ndarray,
    positions: np.ndarray,
    maps: np.ndarray,
    size: tuple[int, int],
    stride: int,
    peaks: str,
    config: DasrConfig,
) -> Regions:
    """One image's regions: a box per probability map (thresholded inside the image's own cells only),
    scored by its peak's activation; `dasr_star` keeps those surviving NMS, `dasr` all of them."""
    if len(positions) == 0:
        return Regions.empty()
    height, width = size
    scores = activation[positions[:, 0], positions[:, 1]].astype(np.float32)
    rows, cols = valid_cells((height, width), stride)
    boxes, valid = map_boxes(maps[:, :rows, :cols], stride, config.tau, config.shape, width, height)
    boxes, scores = boxes[valid], scores[valid]
    keep = nms(boxes, scores, config.nms_iou) if peaks == "dasr_star" else np.argsort(-scores, kind="stable")
    keep = keep[: config.max_regions]
    return Regions(boxes[keep], scores[keep])


def dasr_regions(
    engine: Engine,
    stride: int,
    pixels: np.ndarray,
    feat: list[np.ndarray],
    sizes: list[tuple[int, int]],
    peaks: str,
    config: DasrConfig,
) -> list[Regions]:
    """Regions of a padded batch: pixels (B, 3, H, W); feat[i] (C, h_i, w_i) cropped to image i's own
    cells; sizes[i] = (height, width) of image i's pixels in the top-left corner of the batch.

    `dasr` back-propagates the 3x3 local maxima of the mean activation map and keeps a region per
    peak; `dasr_star` back-propagates every location above the map's mean and keeps the regions
    that survive NMS at IoU `config.nms_iou`, best activation first. Peaks are searched and
    probability maps thresholded inside each image's own cells only, never in the padding.
    """
    activations, seeds, maps = seed_maps(engine, pixels, feat, peaks, config.seeds_per_run)
    return [
        regions_from_maps(activation, positions, image_maps, size, stride, peaks, config)
        for activation, positions, image_maps, size in zip(activations, seeds, maps, sizes)
    ]


def dasr_region_sets(
    engine: Engine,
    stride: int,
    pixels: np.ndarray,
    feat: list[np.ndarray],
    sizes: list[tuple[int, int]],
    kinds: tuple[str, ...],
    config: DasrConfig,
) -> dict[str, list[Regions]]:
    """`dasr_regions` of several peak kinds from one back-propagation of the union of their seeds: a seed's
    probability map does not depend on the other seeds, and most DASR peaks are DASR* seeds too, so an index
    built with both costs about what DASR* alone does."""
    activations = [mean_activation(f) for f in feat]
    found = {kind: [PEAK_FINDERS[kind](a) for a in activations] for kind in kinds}
    union = [
        np.unique(np.concatenate([found[kind][i] for kind in kinds]).reshape(-1, 2), axis=0)
        for i in range(len(activations))
    ]
    maps = backpropagate_seeds(engine, pixels, union, config.seeds_per_run)
    regions: dict[str, list[Regions]] = {kind: [] for kind in kinds}
    for i, (activation, size) in enumerate(zip(activations, sizes)):
        width = activation.shape[1]
        linear = union[i][:, 0] * width + union[i][:, 1]  # sorted: np.unique orders rows by y, then x
        for kind in kinds:
            positions = found[kind][i].reshape(-1, 2)
            rows = np.searchsorted(linear, positions[:, 0] * width + positions[:, 1])
            regions[kind].append(regions_from_maps(activation, positions, maps[i][rows], size, stride, kind, config))
    return regions
