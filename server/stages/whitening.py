"""PCA-whitening learned from indexed descriptors (Jegou & Chum 2012), PCA reduction, and the l2 -> PCA(-w) -> l2
chain both are applied by."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from inserve.server.stages.pooling import l2_normalize


@dataclass(frozen=True)
class Whitening:
    mean: np.ndarray  # (D,)
    projection: np.ndarray  # (D', D): rows are principal axes, scaled by eigenvalue^-1/2 when whitening

    @property
    def dims(self) -> int:
        return self.projection.shape[0]

    def apply(self, raw: np.ndarray) -> np.ndarray:
        """l2 -> centre, project (and whiten) -> l2."""
        x = l2_normalize(np.atleast_2d(raw))
        return l2_normalize((x - self.mean) @ self.projection.T)


def space_transform(whitening: Whitening | None, raw: np.ndarray) -> np.ndarray:
    """Raw vectors (N, D) in a vector space's coordinates: its learned transform, or l2-normalised when it has
    none (both stores' spaces apply this)."""
    raw = np.atleast_2d(np.asarray(raw, dtype=np.float32))
    return whitening.apply(raw) if whitening is not None else l2_normalize(raw)


def principal_axes(
    raw: np.ndarray, eps: float = 1e-6, centred: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean (D,; 0 when not `centred`), eigenvalues (K,) and axes (D, K), largest first, of the covariance (or,
    not centred, the second moments) of l2-normalised descriptors (N, D); only the K that the data supports:
    eigenvalues above `eps` times the largest, and at most N - 1 (centred) or N."""
    x = l2_normalize(np.asarray(raw, dtype=np.float64)).astype(np.float64)
    if len(x) < 2:
        raise ValueError(f"PCA needs at least 2 vectors, got {len(x)}")
    mean = x.mean(axis=0) if centred else np.zeros(x.shape[1])
    centred_x = x - mean
    values, vectors = np.linalg.eigh(centred_x.T @ centred_x / (len(x) - 1))
    order = np.argsort(values)[::-1]
    values, vectors = values[order], vectors[:, order]
    keep = min(int(np.sum(values > eps * values[0])), len(x) - 1 if centred else len(x))
    return mean, values[:keep], vectors[:, :keep]


def pca_whiten(raw: np.ndarray, dims: int | None = None, eps: float = 1e-6, shrinkage: float = 0.0) -> Whitening:
    """Learn PCA-whitening from raw descriptors (N, D), l2-normalised first.

    Keeps at most `dims` components and never more than the data supports (N - 1, and eigenvalues
    above `eps` times the largest), so a small index cannot produce an unstable whitening.

    `shrinkage` a regularises it: component i is scaled by (lambda_i + a * lambda_1)^-1/2 instead of
    lambda_i^-1/2. With few vectors per dimension the smallest eigenvalues are mostly noise, and plain
    whitening blows that noise up (holidays-dev GeM, 405 images, 1280-d: 0.824 mAP unwhitened, 0.029 whitened
    on all 404 dims, 0.866 with a = 0.1).
    """
    mean, values, vectors = principal_axes(raw, eps)
    keep = min(len(values), dims or len(values))
    projection = vectors[:, :keep].T / np.sqrt(values[:keep] + shrinkage * values[0])[:, None]
    return Whitening(mean.astype(np.float32), projection.astype(np.float32))


def pca_reduce(raw: np.ndarray, dims: int) -> Whitening:
    """Learn a PCA reduction to at most `dims` dimensions: the leading axes of the descriptors' second moments,
    not centred and not whitened, so that dot products are kept as far as the kept axes carry them.

    Why not centred: the mean of region crops is a direction every crop shares; taking it out and l2-normalising
    again changes every cosine. On composite-dev's region vectors (bench/README.md, "Compact storage"), 512 dims
    cost 0.005 mAP uncentred and 0.057 centred; whitening lowered region crops at every setting."""
    mean, _, vectors = principal_axes(raw, centred=False)
    keep = min(vectors.shape[1], dims)
    return Whitening(mean.astype(np.float32), vectors[:, :keep].T.astype(np.float32))
