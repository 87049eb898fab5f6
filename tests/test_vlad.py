"""VLAD with a tiny codebook and k-means, by hand."""

import numpy as np
import pytest

from inserve.server.stages.vlad import kmeans, vlad


def test_vlad_sums_residuals_per_centroid_then_power_law_and_l2() -> None:
    centroids = np.array([[0, 0], [10, 0]], dtype=np.float32)
    x = np.array([[1, 0], [0, 4], [9, 0]], dtype=np.float32)  # two go to centroid 0, one to centroid 1
    # residual sums: c0 = (1, 4), c1 = (-1, 0); signed sqrt: (1, 2), (-1, 0); l2 over sqrt(6)
    np.testing.assert_allclose(vlad(x, centroids, alpha=0.5), np.array([1, 2, -1, 0]) / np.sqrt(6), rtol=1e-6)
    # alpha = 1: plain VLAD
    np.testing.assert_allclose(vlad(x, centroids, alpha=1.0), np.array([1, 4, -1, 0]) / np.sqrt(18), rtol=1e-6)


def test_vlad_of_nothing_is_zero() -> None:
    np.testing.assert_array_equal(vlad(np.zeros((0, 2)), np.eye(2, dtype=np.float32)), np.zeros(4))


def test_kmeans_finds_two_obvious_groups_deterministically() -> None:
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 0.1, (30, 3)), rng.normal(5, 0.1, (20, 3))])
    c = kmeans(x, 2, seed=1)
    order = np.argsort(c[:, 0])
    np.testing.assert_allclose(c[order], [x[:30].mean(0), x[30:].mean(0)], atol=1e-5)
    np.testing.assert_array_equal(c, kmeans(x, 2, seed=1))


def test_kmeans_needs_k_points() -> None:
    with pytest.raises(ValueError, match="at least 4"):
        kmeans(np.zeros((3, 2)), 4)
