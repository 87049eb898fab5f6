"""DASR and DASR* region sources: peaks of the mean activation map, back-propagated by the exported graphs.

Three ways from seeds to boxes (`DasrConfig.mode`):
- `exact`: one top-down pass per seed (dasr_backprop.onnx); each map thresholded at tau, the 2-sigma ellipse of
  the support (seed 004). Costs about one forward pass per seed.
- `adjoint`: the weighted moments of every cell's map from one pass of dasr_moments.onnx (K = 5 functionals
  pulled up, whatever the number of seeds); box = centroid +- `sigmas` standard deviations. No threshold: the
  weighting covers the map's whole mass, so `sigmas` replaces tau and the 2 of the exact ellipse.
- `hybrid`: adjoint boxes for every candidate, NMS on them, exact maps only for the survivors.

`adjoint` is the default: the fastest (12x the exact maps' speed at stride 8 on lite0), and on composite-dev its
boxes localise better than the thresholded ones (dasr_star_crops mAP 0.838 / localisation 0.515, exact 0.808 /
0.451, hybrid 0.799 / 0.440; bench/README.md, issue 12).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from inserve.engines import Engine
from inserve.server.config import STAR_SEED_RULES, DasrConfig
from inserve.server.stages.buckets import valid_cells
from inserve.server.stages.nms import nms
from inserve.server.stages.peaks import above_mean, every_cell, local_maxima, mean_activation
from inserve.server.stages.shapes import map_boxes, moment_boxes, moment_functionals

# DASR* seeds: seed 004 keeps every above-mean cell; with the adjoint every cell (or fewer) costs the same
STAR_SEEDS = dict(zip(STAR_SEED_RULES, (above_mean, every_cell, local_maxima)))


def find_seeds(kind: str, activation: np.ndarray, config: DasrConfig) -> np.ndarray:
    """Seed positions (n, 2), best first: DASR's 3x3 local maxima, or DASR*'s candidates (`config.star_seeds`)."""
    if kind == "dasr":
        return local_maxima(activation)
    return STAR_SEEDS[config.star_seeds](activation)


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


def batch_functionals(pixels: np.ndarray, sizes: list[tuple[int, int]], stride: int) -> np.ndarray:
    """The moments graph's functionals (B, len(MOMENTS), H/s, W/s) for a padded batch: each image's own cells
    weigh, its padding's do not."""
    shape = (pixels.shape[2] // stride, pixels.shape[3] // stride)
    return np.stack([moment_functionals(shape, valid_cells(size, stride)) for size in sizes])


def seed_moments(
    engine: Engine, stride: int, pixels: np.ndarray, feat: list[np.ndarray], sizes: list[tuple[int, int]]
) -> list[np.ndarray]:
    """Per image, the moments (len(MOMENTS), h, w) of the map of every cell of its own `feat` cells as a seed,
    in one run of the moments graph over the padded batch. Indexing gets them with the backbone's maps instead
    (Pipeline.features); this is for batches whose backbone ran alone."""
    feeds = {"image": pixels, "functionals": batch_functionals(pixels, sizes, stride)}
    out = engine.run(feeds, ["moments"])["moments"]
    return [m[:, : f.shape[1], : f.shape[2]] for m, f in zip(out, feat)]


def _kept(boxes: np.ndarray, valid: np.ndarray, scores: np.ndarray, peaks: str, config: DasrConfig) -> np.ndarray:
    """Indices of the regions kept, best activation first: `dasr_star` those surviving NMS, `dasr` all."""
    (candidates,) = np.nonzero(valid)
    boxes, scores = boxes[candidates], scores[candidates]
    keep = nms(boxes, scores, config.nms_iou) if peaks == "dasr_star" else np.argsort(-scores, kind="stable")
    return candidates[keep[: config.max_regions]]


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
    keep = _kept(boxes, valid, scores, peaks, config)
    return Regions(boxes[keep], scores[keep])


def regions_from_moments(
    activation: np.ndarray,
    positions: np.ndarray,
    moments: np.ndarray,
    size: tuple[int, int],
    stride: int,
    peaks: str,
    config: DasrConfig,
) -> tuple[Regions, np.ndarray]:
    """One image's regions from the moments (len(MOMENTS), h, w) of every seed's map: `regions_from_maps` with
    each box from its map's weighted moments instead of the thresholded map; and the seed positions kept."""
    height, width = size
    positions = positions.reshape(-1, 2)
    scores = activation[positions[:, 0], positions[:, 1]].astype(np.float32)
    boxes, valid = moment_boxes(moments[:, positions[:, 0], positions[:, 1]].T, stride, config.sigmas, width, height)
    keep = _kept(boxes, valid, scores, peaks, config)
    return Regions(boxes[keep], scores[keep]), positions[keep]


def dasr_regions(
    engines: DasrEngines,
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
    return dasr_region_sets(engines, stride, pixels, feat, sizes, (peaks,), config)[peaks]


@dataclass(frozen=True)
class DasrEngines:
    """The DASR graphs at one stop stride: `backprop` for the exact maps, `moments` for the adjoint (each may be
    None where the region mode does not run it)."""

    backprop: Engine | None
    moments: Engine | None


def dasr_region_sets(
    engines: DasrEngines,
    stride: int,
    pixels: np.ndarray,
    feat: list[np.ndarray],
    sizes: list[tuple[int, int]],
    kinds: tuple[str, ...],
    config: DasrConfig,
    moments: list[np.ndarray] | None = None,
) -> dict[str, list[Regions]]:
    """`dasr_regions` of several peak kinds at once. `exact`: one back-propagation of the union of their seeds (a
    seed's map does not depend on the other seeds, and most DASR peaks are DASR* seeds too); `adjoint`: one
    moments run gives every cell's box (none when `moments`, per image, came with the backbone's maps);
    `hybrid`: exact maps of the union of the kinds' NMS survivors."""
    activations = [mean_activation(f) for f in feat]
    found = {kind: [find_seeds(kind, a, config) for a in activations] for kind in kinds}
    if config.mode != "exact":
        if moments is None:
            moments = seed_moments(engines.moments, stride, pixels, feat, sizes)
        adjoint = {
            kind: [
                regions_from_moments(a, p, m, size, stride, kind, config)
                for a, p, m, size in zip(activations, found[kind], moments, sizes)
            ]
            for kind in kinds
        }
        if config.mode == "adjoint":
            return {kind: [regions for regions, _ in pairs] for kind, pairs in adjoint.items()}
        found = {kind: [kept for _, kept in pairs] for kind, pairs in adjoint.items()}
    union = [
        np.unique(np.concatenate([found[kind][i] for kind in kinds]).reshape(-1, 2), axis=0)
        for i in range(len(activations))
    ]
    maps = backpropagate_seeds(engines.backprop, pixels, union, config.seeds_per_run)
    regions: dict[str, list[Regions]] = {kind: [] for kind in kinds}
    for i, (activation, size) in enumerate(zip(activations, sizes)):
        width = activation.shape[1]
        linear = union[i][:, 0] * width + union[i][:, 1]  # sorted: np.unique orders rows by y, then x
        for kind in kinds:
            positions = found[kind][i].reshape(-1, 2)
            rows = np.searchsorted(linear, positions[:, 0] * width + positions[:, 1])
            regions[kind].append(regions_from_maps(activation, positions, maps[i][rows], size, stride, kind, config))
    return regions
