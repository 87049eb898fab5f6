"""VLAD (Jegou et al.) over a set of descriptors with a tiny codebook, as seed 004 does with DASR* regions."""

from __future__ import annotations

import numpy as np

from inserve.server.stages.pooling import l2_normalize


def kmeans(x: np.ndarray, k: int, iterations: int = 100, seed: int = 0) -> np.ndarray:
    """Centroids (k, D) by Lloyd's algorithm from a k-means++ start; deterministic for a given seed.
    An emptied cluster is restarted at the point farthest from its centroid."""
    x = np.asarray(x, dtype=np.float64)
    if len(x) < k:
        raise ValueError(f"k-means with k={k} needs at least {k} vectors, got {len(x)}")
    rng = np.random.default_rng(seed)
    centroids = [x[rng.integers(len(x))]]
    for _ in range(1, k):
        d2 = np.min(((x[:, None, :] - np.asarray(centroids)[None]) ** 2).sum(-1), axis=1)
        total = d2.sum()
        centroids.append(x[rng.choice(len(x), p=d2 / total)] if total > 0 else x[rng.integers(len(x))])
    c = np.asarray(centroids)
    for _ in range(iterations):
        d2 = ((x[:, None, :] - c[None]) ** 2).sum(-1)
        assign = np.argmin(d2, axis=1)
        new = c.copy()
        for j in range(k):
            members = x[assign == j]
            new[j] = members.mean(axis=0) if len(members) else x[int(np.argmax(d2.min(axis=1)))]
        if np.allclose(new, c):
            break
        c = new
    return c.astype(np.float32)


def vlad(x: np.ndarray, centroids: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """(N, D) descriptors -> (k * D,): per centroid the sum of residuals of the descriptors assigned to it,
    then signed power-law |v|^alpha and l2 normalisation. No descriptors -> zeros."""
    k, dim = centroids.shape
    out = np.zeros((k, dim), dtype=np.float64)
    x = np.asarray(x, dtype=np.float64).reshape(-1, dim)
    if len(x):
        assign = np.argmin(((x[:, None, :] - centroids[None].astype(np.float64)) ** 2).sum(-1), axis=1)
        np.add.at(out, assign, x - centroids[assign])
    out = np.sign(out) * np.power(np.abs(out), alpha)
    return l2_normalize(out.reshape(-1).astype(np.float32))
