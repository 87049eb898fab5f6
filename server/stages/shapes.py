"""From a DASR probability map to a box: threshold, ellipse of the second moments, its bounding rectangle."""

from __future__ import annotations

import numpy as np

SHAPES = ("moments", "official")


def support(prob: np.ndarray, tau: float, shape: str) -> np.ndarray:
    """The activated pixels: `moments` keeps r >= tau on the map normalised to [0, 1] (seed 004, tau = 0.1);
    `official` keeps the pixels above the map's 95th percentile, as the official DASR code does."""
    if shape == "moments":
        top = prob.max()
        return prob >= tau * top if top > 0 else np.zeros(prob.shape, dtype=bool)
    if shape == "official":
        return prob > np.percentile(prob, 95)
    raise ValueError(f"unknown shape estimation {shape!r}; choose one of {SHAPES}")


def ellipse_box(mask: np.ndarray, stride: int) -> np.ndarray | None:
    """Bounding rectangle (x1, y1, x2, y2, in input pixels) of the ellipse with the mask's second moments.

    An ellipse whose points have covariance S is {x : x^T (4S)^-1 x <= 1} (2 sigma), and its bounding
    rectangle has half-sides 2 sqrt(S_xx), 2 sqrt(S_yy). Cells are `stride` pixels wide; a cell's
    own extent adds stride^2/12 to each variance, so a single cell gives a stride-sized box.
    """
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    cx = (xs + 0.5) * stride
    cy = (ys + 0.5) * stride
    cell = stride * stride / 12.0
    half_w = 2.0 * np.sqrt(cx.var() + cell)
    half_h = 2.0 * np.sqrt(cy.var() + cell)
    mx, my = cx.mean(), cy.mean()
    return np.array([mx - half_w, my - half_h, mx + half_w, my + half_h], dtype=np.float32)


def map_boxes(
    maps: np.ndarray, stride: int, tau: float, shape: str, width: int, height: int
) -> tuple[np.ndarray, np.ndarray]:
    """Boxes (N, 4) for maps (N, h, w), clipped to a width x height input, and which maps gave one."""
    boxes, valid = np.zeros((len(maps), 4), dtype=np.float32), np.zeros(len(maps), dtype=bool)
    for i, prob in enumerate(maps):
        box = ellipse_box(support(prob, tau, shape), stride)
        if box is not None:
            boxes[i] = np.clip(box, 0, [width, height, width, height])
            valid[i] = boxes[i, 2] > boxes[i, 0] and boxes[i, 3] > boxes[i, 1]
    return boxes, valid
