"""Pooling of a (C, H, W) map into one vector: over the whole map, or inside boxes."""

from __future__ import annotations

import numpy as np


def gem(feat: np.ndarray, p: float = 3.0, eps: float = 1e-6) -> np.ndarray:
    """Generalised mean (Radenovic et al.): p=1 is average pooling, p -> inf max pooling."""
    x = np.maximum(feat.reshape(feat.shape[0], -1).astype(np.float64), eps)
    return np.power(np.mean(np.power(x, p), axis=1), 1.0 / p).astype(np.float32)


def mac(feat: np.ndarray) -> np.ndarray:
    return feat.reshape(feat.shape[0], -1).max(axis=1).astype(np.float32)


def spoc(feat: np.ndarray) -> np.ndarray:
    return feat.reshape(feat.shape[0], -1).sum(axis=1).astype(np.float32)


def box_cells(boxes: np.ndarray, stride: int, height: int, width: int) -> np.ndarray:
    """Boxes in input pixels -> half-open cell ranges (N, 4) [x0, y0, x1, y1) of a stride-`stride` map.

    A cell belongs to a box when the box covers its centre; every box gets at least its centre cell.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    x0 = np.ceil(boxes[:, 0] / stride - 0.5)
    y0 = np.ceil(boxes[:, 1] / stride - 0.5)
    x1 = np.floor(boxes[:, 2] / stride - 0.5) + 1
    y1 = np.floor(boxes[:, 3] / stride - 0.5) + 1
    cx = np.floor((boxes[:, 0] + boxes[:, 2]) / (2 * stride))
    cy = np.floor((boxes[:, 1] + boxes[:, 3]) / (2 * stride))
    x0, x1 = np.where(x1 <= x0, cx, x0), np.where(x1 <= x0, cx + 1, x1)
    y0, y1 = np.where(y1 <= y0, cy, y0), np.where(y1 <= y0, cy + 1, y1)
    cells = np.stack([np.clip(x0, 0, width - 1), np.clip(y0, 0, height - 1), x1, y1], axis=1)
    cells[:, 2] = np.clip(np.maximum(cells[:, 2], cells[:, 0] + 1), 1, width)
    cells[:, 3] = np.clip(np.maximum(cells[:, 3], cells[:, 1] + 1), 1, height)
    return cells.astype(np.int64)


def box_average(desc: np.ndarray, boxes: np.ndarray, stride: int) -> np.ndarray:
    """Average of a (C, H, W) map inside each box (N, 4) in input pixels -> (N, C), via an integral image."""
    channels, height, width = desc.shape
    integral = np.zeros((channels, height + 1, width + 1), dtype=np.float64)
    integral[:, 1:, 1:] = desc.astype(np.float64).cumsum(1).cumsum(2)
    cells = box_cells(boxes, stride, height, width)
    x0, y0, x1, y1 = cells.T
    sums = integral[:, y1, x1] - integral[:, y0, x1] - integral[:, y1, x0] + integral[:, y0, x0]
    area = ((x1 - x0) * (y1 - y0)).astype(np.float64)
    return (sums / area).T.astype(np.float32)


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def cells_max(feat: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """MAC of a (C, H, W) map inside each half-open cell range (N, 4) [x0, y0, x1, y1) -> (N, C)."""
    cells = np.asarray(cells, dtype=np.int64).reshape(-1, 4)
    out = np.zeros((len(cells), feat.shape[0]), dtype=np.float32)
    for i, (x0, y0, x1, y1) in enumerate(cells):
        out[i] = feat[:, y0:y1, x0:x1].reshape(feat.shape[0], -1).max(axis=1)
    return out


def box_max(feat: np.ndarray, boxes: np.ndarray, stride: int) -> np.ndarray:
    """MAC of a (C, H, W) map inside each box (N, 4) in input pixels -> (N, C) (DeepVision's RPA-max)."""
    return cells_max(feat, box_cells(boxes, stride, feat.shape[1], feat.shape[2]))


def masked_max(feat: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """MAC of a (C, H, W) map over each boolean mask (N, H, W) -> (N, C); an empty mask gives zeros."""
    flat = feat.reshape(feat.shape[0], -1)
    out = np.zeros((len(masks), feat.shape[0]), dtype=np.float32)
    for i, mask in enumerate(masks):
        if mask.any():
            out[i] = flat[:, mask.reshape(-1)].max(axis=1)
    return out


def masks_to_boxes(masks: np.ndarray, stride: int) -> np.ndarray:
    """Bounding boxes (N, 4) in input pixels of boolean cell masks (N, H, W); an empty mask gives a zero box."""
    boxes = np.zeros((len(masks), 4), dtype=np.float32)
    for i, mask in enumerate(masks):
        ys, xs = np.nonzero(mask)
        if len(xs):
            boxes[i] = (xs.min() * stride, ys.min() * stride, (xs.max() + 1) * stride, (ys.max() + 1) * stride)
    return boxes
