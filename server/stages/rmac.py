"""R-MAC regions (Tolias et al. 2016): square windows at L scales, overlapping by about 40 %.

The layout follows cnnimageretrieval-pytorch's `rmac`: the whole map, then at scale l squares of side
floor(2 min(H, W) / (l + 1)), with one more window along the long side chosen so that neighbours
overlap by the fraction closest to 0.4.
"""

from __future__ import annotations

import math

import numpy as np

OVERLAP = 0.4
STEPS = np.array([2, 3, 4, 5, 6, 7], dtype=np.float64)


def rmac_grid(height: int, width: int, levels: int = 3, overlap: float = OVERLAP) -> np.ndarray:
    """Regions (N, 4) as half-open cell ranges [x0, y0, x1, y1) of a height x width map, the whole map first."""
    side = min(width, height)
    extra_w = extra_h = 0
    if width != height:
        b = (max(height, width) - side) / (STEPS - 1)
        best = int(np.argmin(np.abs((side * side - side * b) / (side * side) - overlap)))
        if height < width:
            extra_w = best + 1
        else:
            extra_h = best + 1
    regions = [(0, 0, width, height)]
    for level in range(1, levels + 1):
        wl = math.floor(2 * side / (level + 1))
        if wl == 0:
            continue
        half = math.floor(wl / 2 - 1)
        xs = _centres(width, wl, half, level + extra_w)
        ys = _centres(height, wl, half, level + extra_h)
        regions += [(x, y, x + wl, y + wl) for y in ys for x in xs]
    return np.asarray(regions, dtype=np.int64)


def _centres(length: int, wl: int, half: int, count: int) -> list[int]:
    step = 0.0 if count == 1 else (length - wl) / (count - 1)
    return [int(math.floor(half + i * step) - half) for i in range(count)]


def cells_to_boxes(cells: np.ndarray, stride: int, width: int, height: int) -> np.ndarray:
    """Cell ranges -> boxes in input pixels, clipped to the width x height input."""
    boxes = np.asarray(cells, dtype=np.float32).reshape(-1, 4) * stride
    return np.clip(boxes, 0, [width, height, width, height]).astype(np.float32)
