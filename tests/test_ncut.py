"""Seed 003's normalized-cut clustering: Eq. 2-3 similarity by hand, obvious blobs, masks from maps."""

import numpy as np

from inserve.server.stages.ncut import (
    area_resize,
    colour_clusters,
    feature_clusters,
    local_pca,
    ncut_similarity,
    normalized_cut,
)


def test_similarity_of_eq_3_by_hand() -> None:
    x = np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
    variances = np.array([3.0, 1.0])  # weights 3/4, 1/4
    d01, d02 = np.sqrt(0.75 * 9), np.sqrt(0.25 * 16)
    d12 = np.sqrt(0.75 * 9 + 0.25 * 16)
    z = 0.05 * d12  # the largest distance
    s = ncut_similarity(x, variances)
    np.testing.assert_allclose(s[0, 1], np.exp(-d01 / z) ** 2)
    np.testing.assert_allclose(s[0, 2], np.exp(-d02 / z) ** 2)
    np.testing.assert_allclose(np.diag(s), 1.0)
    np.testing.assert_allclose(s, s.T)


def _blobs(centres: list[tuple[float, float]], sizes: list[int]) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.concatenate([rng.normal(c, 0.1, (n, 2)) for c, n in zip(centres, sizes)])


def test_two_obvious_blobs_are_the_two_clusters() -> None:
    x = _blobs([(0, 0), (5, 5)], [20, 12])
    labels = normalized_cut(ncut_similarity(x, x.var(axis=0)), 2)
    np.testing.assert_array_equal(labels, [0] * 20 + [1] * 12)


def test_three_blobs_interleaved() -> None:
    x = _blobs([(0, 0), (5, 0), (0, 5)], [10, 10, 10])
    order = np.random.default_rng(1).permutation(30)
    labels = normalized_cut(ncut_similarity(x[order], x.var(axis=0)), 3)
    truth = np.repeat([0, 1, 2], 10)[order]
    # the same partition, whatever the names
    assert len(set(zip(labels, truth))) == 3


def test_fewer_points_than_clusters_gives_singletons() -> None:
    np.testing.assert_array_equal(normalized_cut(np.ones((3, 3)), 5), [0, 1, 2])


def test_local_pca_keeps_the_top_components_with_their_variances() -> None:
    rng = np.random.default_rng(0)
    x = np.stack([rng.normal(0, 3, 500), rng.normal(0, 1, 500), np.zeros(500)], axis=1)
    projected, variances = local_pca(x, 2)
    assert projected.shape == (500, 2)
    np.testing.assert_allclose(variances, [9, 1], rtol=0.15)


def test_feature_clusters_split_an_object_from_its_background() -> None:
    feat = np.zeros((8, 6, 6), dtype=np.float32)
    feat[:4] = 0.1
    feat[4:, 1:3, 1:4] = 5.0  # an "object": strong responses in other channels
    masks = feature_clusters(feat, 4, (2,))
    assert masks.shape == (2, 6, 6)
    obj = np.zeros((6, 6), dtype=bool)
    obj[1:3, 1:4] = True
    assert any(np.array_equal(m, obj) for m in masks)


def test_colour_clusters_of_a_two_colour_image() -> None:
    image = np.zeros((3, 64, 64), dtype=np.float32)
    image[0, :, :32] = 255  # red left half, black right half
    masks = colour_clusters(image, (4, 4), 2)
    left = np.zeros((4, 4), dtype=bool)
    left[:, :2] = True
    assert any(np.array_equal(m, left) for m in masks) and any(np.array_equal(m, ~left) for m in masks)
    np.testing.assert_allclose(area_resize(image, 4, 4)[0, 0], [255, 255, 0, 0])
