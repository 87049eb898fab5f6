"""PCA-whitening learned from indexed descriptors (Jegou & Chum 2012), and the l2 -> PCA-w -> l2 chain."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from inserve.server.stages.pooling import l2_normalize


@dataclass(frozen=True)
class Whitening:
    mean: np.ndarray  # (D,)
    projection: np.ndarray  # (D', D): rows are eigenvectors scaled by eigenvalue^-1/2

    @property
    def dims(self) -> int:
        return self.projection.shape[0]

    def apply(self, raw: np.ndarray) -> np.ndarray:
        """l2 -> centre, project, whiten -> l2."""
        x = l2_normalize(np.atleast_2d(raw))
        return l2_normalize((x - self.mean) @ self.projection.T)


def pca_whiten(raw: np.ndarray, dims: int | None = None, eps: float = 1e-6, shrinkage: float = 0.0) -> Whitening:
    """Learn PCA-whitening from raw descriptors (N, D), l2-normalised first.

    Keeps at most `dims` components and never more than the data supports (N - 1, and eigenvalues
    above `eps` times the largest), so a small index cannot produce an unstable whitening.

    `shrinkage` a regularises it: component i is scaled by (lambda_i + a * lambda_1)^-1/2 instead of
    lambda_i^-1/2. With few vectors per dimension the smallest eigenvalues are mostly noise, and plain
    whitening blows that noise up (holidays-dev GeM, 405 images, 1280-d: 0.824 mAP unwhitened, 0.029 whitened
    on all 404 dims, 0.866 with a = 0.1).
    """
    x = l2_normalize(np.asarray(raw, dtype=np.float64)).astype(np.float64)
    if len(x) < 2:
        raise ValueError(f"PCA-whitening needs at least 2 vectors, got {len(x)}")
    mean = x.mean(axis=0)
    centred = x - mean
    cov = centred.T @ centred / (len(x) - 1)
    values, vectors = np.linalg.eigh(cov)
    order = np.argsort(values)[::-1]
    values, vectors = values[order], vectors[:, order]
    keep = int(np.sum(values > eps * values[0]))
    keep = min(keep, len(x) - 1, dims or keep)
    projection = vectors[:, :keep].T / np.sqrt(values[:keep] + shrinkage * values[0])[:, None]
    return Whitening(mean.astype(np.float32), projection.astype(np.float32))
