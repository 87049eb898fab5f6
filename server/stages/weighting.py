"""Spatial and channel weights applied before sum-pooling: CroW (Kalantidis et al.) and class activation maps."""

from __future__ import annotations

import numpy as np


def crow_spatial_weights(feat: np.ndarray, a: float = 2.0, b: float = 2.0) -> np.ndarray:
    """(C, h, w) -> (h, w): the summed response, normalised by its l_a norm, to the power 1/b (CroW Eq. 4)."""
    summed = feat.astype(np.float64).sum(axis=0)
    norm = np.power(np.power(np.abs(summed), a).sum(), 1.0 / a)
    if norm <= 0:
        return np.zeros(summed.shape, dtype=np.float32)
    return np.power(np.maximum(summed / norm, 0.0), 1.0 / b).astype(np.float32)


def crow_channel_weights(feat: np.ndarray) -> np.ndarray:
    """(C, h, w) -> (C,): log of the inverse channel sparsity, log(sum_n Q_n / Q_k) with Q_k the fraction of
    non-zero responses of channel k (CroW Eq. 6, seed 001 Eqs. 2-3); channels never active get 0."""
    q = (feat > 0).reshape(feat.shape[0], -1).mean(axis=1).astype(np.float64)
    total = q.sum()
    weights = np.zeros_like(q)
    active = q > 0
    weights[active] = np.log(total / q[active])
    return weights.astype(np.float32)


def normalize_maps(maps: np.ndarray) -> np.ndarray:
    """(N, h, w) -> each map min-max scaled to [0, 1] (a constant map becomes all zeros), as seed 001 does with CAMs."""
    maps = maps.astype(np.float64)
    low = maps.min(axis=(1, 2), keepdims=True)
    span = maps.max(axis=(1, 2), keepdims=True) - low
    return np.where(span > 0, (maps - low) / np.where(span > 0, span, 1.0), 0.0).astype(np.float32)


def weighted_sums(feat: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Sum-pooling of a (C, h, w) map under each of N spatial weight maps (N, h, w) -> (N, C)."""
    return np.einsum("chw,nhw->nc", feat.astype(np.float64), weights.astype(np.float64)).astype(np.float32)


def crow(feat: np.ndarray, a: float = 2.0, b: float = 2.0) -> np.ndarray:
    """CroW descriptor: channel weights times the spatially weighted sum of the map."""
    spatial = crow_spatial_weights(feat, a, b)
    return crow_channel_weights(feat) * weighted_sums(feat, spatial[None])[0]


def cam_class_vectors(feat: np.ndarray, cams: np.ndarray) -> np.ndarray:
    """Seed 001 Eq. 4: one vector per class, f_k^(c) = CW_k sum_ij feat_kij CAM^(c)_ij with CAMs scaled to [0, 1]."""
    return crow_channel_weights(feat) * weighted_sums(feat, normalize_maps(cams))
