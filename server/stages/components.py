"""Boxes from thresholded maps: the largest 4-connected component above a fraction of the map's maximum."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def component_labels(mask: np.ndarray) -> np.ndarray:
    """4-connected components of a boolean (h, w) mask: labels 1..n, 0 = background (flood fill; maps are small)."""
    labels = np.zeros(mask.shape, dtype=np.int64)
    h, w = mask.shape
    current = 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        current += 1
        labels[y0, x0] = current
        stack = [(y0, x0)]
        while stack:
            y, x = stack.pop()
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = current
                    stack.append((ny, nx))
    return labels


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask (ties: the first in raster order)."""
    labels = component_labels(mask)
    if labels.max() == 0:
        return np.zeros(mask.shape, dtype=bool)
    sizes = np.bincount(labels.reshape(-1))[1:]
    return labels == int(np.argmax(sizes)) + 1


def threshold_boxes(heatmap: np.ndarray, fractions: Sequence[float], stride: int) -> np.ndarray:
    """Seed 001's re-ranking regions: for each fraction t, the bounding box (input pixels) of the largest
    connected component of heatmap >= t * max. Boxes (N, 4), duplicates removed, in fraction order."""
    top = float(heatmap.max())
    boxes: list[tuple[float, ...]] = []
    if top <= 0:
        return np.zeros((0, 4), dtype=np.float32)
    for fraction in fractions:
        ys, xs = np.nonzero(largest_component(heatmap >= fraction * top))
        box = (xs.min() * stride, ys.min() * stride, (xs.max() + 1) * stride, (ys.max() + 1) * stride)
        if box not in boxes:
            boxes.append(box)
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
