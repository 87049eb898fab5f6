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


MOMENTS = ("mass", "x", "y", "xx", "yy")  # what dasr_moments.onnx pulls up, in this order


def moment_functionals(shape: tuple[int, int], valid: tuple[int, int]) -> np.ndarray:
    """(len(MOMENTS), h, w) weightings of a stop map's cells whose sums against a map are its mass and its
    first and second moments, in cell units (cell centres at index + 0.5); zero outside the `valid` rows and
    columns, so that the bucket's padding counts for nothing (as the exact maps are cropped to them)."""
    h, w = shape
    rows, cols = valid
    y = np.zeros((h, w), dtype=np.float64)
    x = np.zeros((h, w), dtype=np.float64)
    mask = np.zeros((h, w), dtype=np.float64)
    mask[:rows, :cols] = 1.0
    y[:rows, :cols] = (np.arange(rows) + 0.5)[:, None]
    x[:rows, :cols] = (np.arange(cols) + 0.5)[None, :]
    return np.stack([mask, x, y, x * x, y * y]).astype(np.float32)


def map_moments(maps: np.ndarray) -> np.ndarray:
    """(N, len(MOMENTS)): the same moments summed from explicit maps (N, h, w), for the `exact` path's tests."""
    functionals = moment_functionals(maps.shape[1:], maps.shape[1:]).astype(np.float64)
    return np.einsum("khw,nhw->nk", functionals, maps.astype(np.float64))


def moment_boxes(
    moments: np.ndarray, stride: int, sigmas: float, width: int, height: int
) -> tuple[np.ndarray, np.ndarray]:
    """Boxes (N, 4) from the weighted moments (N, len(MOMENTS)) of N maps: centroid +- `sigmas` standard
    deviations, each variance with the cell's own extent (1/12 cell^2) added as in `ellipse_box`; clipped to a
    width x height input. Maps without mass give no box."""
    mass, sx, sy, sxx, syy = (moments[:, i].astype(np.float64) for i in range(len(MOMENTS)))
    valid = mass > 0
    m = np.where(valid, mass, 1.0)
    mx, my = sx / m, sy / m
    half_w = sigmas * np.sqrt(np.maximum(sxx / m - mx * mx, 0.0) + 1 / 12)
    half_h = sigmas * np.sqrt(np.maximum(syy / m - my * my, 0.0) + 1 / 12)
    boxes = np.stack([mx - half_w, my - half_h, mx + half_w, my + half_h], axis=1) * stride
    boxes = np.clip(boxes, 0, [width, height, width, height]).astype(np.float32)
    valid &= (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return boxes, valid
