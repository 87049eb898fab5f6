"""Seed 003's clustering of feature-map locations: PCA of the local vectors, then normalized cut (Shi & Malik)
on the feature similarity of Eq. 3, with no spatial term, discretised as in Yu & Shi's multiclass spectral
clustering (the discretisation of the reference NCut code, made deterministic)."""

from __future__ import annotations

import numpy as np


def local_pca(vectors: np.ndarray, dims: int) -> tuple[np.ndarray, np.ndarray]:
    """Project local vectors (N, D) onto their own top `dims` principal components -> (N, dims) and the
    variance of each kept component (dims,)."""
    x = vectors.astype(np.float64)
    centred = x - x.mean(axis=0)
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    dims = min(dims, vt.shape[0])
    variances = singular[:dims] ** 2 / max(len(x) - 1, 1)
    return centred @ vt[:dims].T, variances


def ncut_similarity(x: np.ndarray, variances: np.ndarray, scale: float = 0.05) -> np.ndarray:
    """Eqs. 2-3: d_ij = sqrt(sum_k w_k (x_ik - x_jk)^2) with w_k = variance_k / sum of variances, and
    S = exp(-d / z)^2 with z = scale * max d. Identical points (all d = 0) are fully similar."""
    total = variances.sum()
    weights = variances / total if total > 0 else np.full(len(variances), 1.0 / max(len(variances), 1))
    diff = x[:, None, :] - x[None, :, :]
    d = np.sqrt(np.einsum("ijk,k->ij", diff * diff, weights))
    z = scale * d.max()
    if z <= 0:
        return np.ones_like(d)
    return np.exp(-d / z) ** 2


def normalized_cut(similarity: np.ndarray, k: int, iterations: int = 30) -> np.ndarray:
    """Cluster labels (N,) in [0, k') of a symmetric similarity matrix (N, N), k' <= k clusters, relabelled
    0.. in order of first appearance. Fewer points than clusters: every point is its own cluster."""
    n = len(similarity)
    if n <= k:
        return np.arange(n, dtype=np.int64)
    degree = similarity.sum(axis=1)
    inv_sqrt = 1.0 / np.sqrt(np.maximum(degree, 1e-12))
    normalised = similarity * inv_sqrt[:, None] * inv_sqrt[None, :]
    _, vectors = np.linalg.eigh((normalised + normalised.T) / 2)
    embedding = vectors[:, ::-1][:, :k] * inv_sqrt[:, None]
    return _relabel(_discretise(embedding, iterations))


def _discretise(embedding: np.ndarray, iterations: int) -> np.ndarray:
    """Yu & Shi: rotate the row-normalised eigenvectors towards the nearest indicator matrix."""
    n, k = embedding.shape
    rows = embedding / np.maximum(np.linalg.norm(embedding, axis=1, keepdims=True), 1e-12)
    rotation = np.zeros((k, k))
    rotation[:, 0] = rows[0]
    closeness = np.zeros(n)
    for j in range(1, k):
        closeness += np.abs(rows @ rotation[:, j - 1])
        rotation[:, j] = rows[int(np.argmin(closeness))]
    previous = np.inf
    labels = np.zeros(n, dtype=np.int64)
    for _ in range(iterations):
        labels = np.argmax(rows @ rotation, axis=1)
        indicator = np.zeros((n, k))
        indicator[np.arange(n), labels] = 1.0
        u, s, vt = np.linalg.svd(indicator.T @ rows)
        objective = 2.0 * (n - s.sum())
        if abs(objective - previous) < 1e-10:
            break
        previous = objective
        rotation = vt.T @ u.T
    return labels


def _relabel(labels: np.ndarray) -> np.ndarray:
    _, first = np.unique(labels, return_index=True)
    order = np.argsort(first)
    mapping = np.empty(labels.max() + 1, dtype=np.int64)
    mapping[np.unique(labels)[order]] = np.arange(len(order))
    return mapping[labels]


def cluster_masks(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Labels of the h*w locations -> boolean masks (n_clusters, h, w)."""
    count = int(labels.max()) + 1 if len(labels) else 0
    return np.stack([(labels == c).reshape(shape) for c in range(count)]) if count else np.zeros((0, *shape), bool)


def feature_clusters(feat: np.ndarray, dims: int, counts: tuple[int, ...]) -> np.ndarray:
    """Seed 003's feature clusters of a (C, h, w) map: PCA to `dims`, one normalized cut per count -> masks."""
    _, h, w = feat.shape
    x, variances = local_pca(feat.reshape(feat.shape[0], -1).T, dims)
    similarity = ncut_similarity(x, variances)
    return np.concatenate([cluster_masks(normalized_cut(similarity, k), (h, w)) for k in counts])


def colour_clusters(pixels: np.ndarray, shape: tuple[int, int], count: int) -> np.ndarray:
    """Seed 003's colour clusters: the (3, H, W) image averaged down to the map's (h, w), clustered on RGB."""
    h, w = shape
    rgb = area_resize(pixels, h, w).reshape(3, -1).T.astype(np.float64)
    variances = rgb.var(axis=0)
    return cluster_masks(normalized_cut(ncut_similarity(rgb, variances), count), shape)


def area_resize(image: np.ndarray, h: int, w: int) -> np.ndarray:
    """(C, H, W) -> (C, h, w) by averaging the pixels that fall in each output cell."""
    _, height, width = image.shape
    ys = np.minimum((np.arange(height) * h) // height, h - 1)
    xs = np.minimum((np.arange(width) * w) // width, w - 1)
    out = np.zeros((image.shape[0], h, w), dtype=np.float64)
    count = np.zeros((h, w), dtype=np.float64)
    np.add.at(out, (slice(None), ys[:, None], xs[None, :]), image.astype(np.float64))
    np.add.at(count, (ys[:, None], xs[None, :]), 1.0)
    return (out / np.maximum(count, 1.0)).astype(np.float32)
