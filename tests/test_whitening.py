"""PCA-whitening and PCA reduction of server/stages/whitening.py (Jegou & Chum 2012): learned on l2-normalised
vectors."""

from __future__ import annotations

import numpy as np
import pytest

from inserve.server.stages.pooling import l2_normalize
from inserve.server.stages.whitening import pca_reduce, pca_whiten


def training(n: int, d: int, seed: int = 0) -> np.ndarray:
    """Correlated, anisotropic vectors (the typical shape of CNN descriptors)."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d, d)) * np.linspace(3.0, 0.2, d)[None, :]
    return (rng.normal(size=(n, d)) @ mixing.T + 2.0).astype(np.float32)


def whitened(raw: np.ndarray, whitening) -> np.ndarray:
    """Training data after centring and projection, before the final l2 normalisation."""
    x = l2_normalize(raw).astype(np.float64)
    return (x - whitening.mean) @ whitening.projection.T.astype(np.float64)


def test_whitened_training_data_has_identity_covariance() -> None:
    raw = training(400, 12)
    w = pca_whiten(raw)
    assert w.dims == 12
    y = whitened(raw, w)
    np.testing.assert_allclose(np.cov(y, rowvar=False), np.eye(12), atol=1e-3)
    np.testing.assert_allclose(y.mean(axis=0), 0.0, atol=1e-5)


def test_kept_dims_are_the_leading_principal_components() -> None:
    raw = training(400, 12)
    w = pca_whiten(raw, dims=5)
    assert w.dims == 5 and w.projection.shape == (5, 12) and w.mean.shape == (12,)
    y = whitened(raw, w)
    np.testing.assert_allclose(np.cov(y, rowvar=False), np.eye(5), atol=1e-3)
    # the five kept directions carry more variance than any discarded one
    x = l2_normalize(raw).astype(np.float64)
    values = np.sort(np.linalg.eigvalsh(np.cov(x, rowvar=False)))[::-1]
    norms = 1.0 / np.linalg.norm(w.projection.astype(np.float64), axis=1) ** 2  # = the kept eigenvalues
    np.testing.assert_allclose(norms, values[:5], rtol=1e-3)


def test_dims_never_exceed_n_minus_1() -> None:
    raw = training(6, 20)
    w = pca_whiten(raw)
    assert w.dims == 5  # 6 centred vectors span at most 5 dimensions
    assert pca_whiten(raw, dims=3).dims == 3
    assert pca_whiten(raw, dims=50).dims == 5
    np.testing.assert_allclose(np.cov(whitened(raw, w), rowvar=False), np.eye(5), atol=1e-3)


def test_degenerate_directions_are_dropped() -> None:
    raw = training(100, 8)
    raw[:, 5:] = 0.0  # three dimensions carry nothing
    assert pca_whiten(raw).dims == 5


def test_fewer_than_two_vectors_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 2 vectors, got 1"):
        pca_whiten(np.ones((1, 4), dtype=np.float32))


def test_apply_is_l2_pca_l2() -> None:
    raw = training(200, 10)
    w = pca_whiten(raw, dims=6)
    queries = training(7, 10, seed=3) * 5.0  # the first l2 makes the input scale irrelevant
    out = w.apply(queries)
    assert out.shape == (7, 6) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    expected = whitened(queries, w)
    np.testing.assert_allclose(out, expected / np.linalg.norm(expected, axis=1, keepdims=True), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(w.apply(queries[0]), out[:1], rtol=1e-5, atol=1e-7)  # one vector in, one row out


def test_shrinkage_adds_a_fraction_of_the_largest_eigenvalue_by_hand() -> None:
    # six unit vectors, four on the x axis and two on y: mean 0, covariance diag(4/5, 2/5) (N - 1 = 5)
    raw = np.array([[1, 0], [-1, 0], [1, 0], [-1, 0], [0, 1], [0, -1]], dtype=np.float32)
    plain, shrunk = pca_whiten(raw), pca_whiten(raw, shrinkage=0.5)
    np.testing.assert_allclose(np.abs(plain.projection), [[0.8**-0.5, 0], [0, 0.4**-0.5]], rtol=1e-5)
    # lambda + 0.5 * lambda_1 = 0.8 + 0.4, 0.4 + 0.4
    np.testing.assert_allclose(np.abs(shrunk.projection), [[1.2**-0.5, 0], [0, 0.8**-0.5]], rtol=1e-5)


def test_reduction_projects_on_the_leading_axes_of_the_second_moments() -> None:
    raw = training(400, 12)
    r = pca_reduce(raw, dims=5)
    assert r.dims == 5
    np.testing.assert_array_equal(r.mean, 0.0)  # not centred
    np.testing.assert_allclose(r.projection @ r.projection.T, np.eye(5), atol=1e-5)  # rotation, no scaling
    x = l2_normalize(raw).astype(np.float64)
    values = np.sort(np.linalg.eigvalsh(x.T @ x))[::-1]
    np.testing.assert_allclose(np.sum((x @ r.projection.T) ** 2, axis=0), values[:5], rtol=1e-3)


def test_reduction_to_all_dims_keeps_every_cosine() -> None:
    raw = training(100, 6)
    r = pca_reduce(raw, dims=6)
    x = l2_normalize(raw).astype(np.float64)
    np.testing.assert_allclose(r.apply(raw) @ r.apply(raw).T, x @ x.T, atol=1e-5)
    assert pca_reduce(training(4, 6), dims=6).dims == 4  # never more than the data supports
