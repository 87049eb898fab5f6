"""CroW spatial and channel weights and seed 001's CAM class vectors, by hand on 2x2 maps."""

import numpy as np

from inserve.server.stages.weighting import (
    cam_class_vectors,
    crow,
    crow_channel_weights,
    crow_spatial_weights,
    normalize_maps,
    weighted_sums,
)

# channel 0 is active everywhere, channel 1 at one location, channel 2 never
FEAT = np.array([[[1, 1], [1, 1]], [[0, 0], [0, 4]], [[0, 0], [0, 0]]], dtype=np.float32)


def test_spatial_weights_are_the_summed_map_over_its_l2_norm_square_rooted() -> None:
    summed = np.array([[1, 1], [1, 5]], dtype=np.float64)  # sum over channels
    expected = np.sqrt(summed / np.sqrt((summed**2).sum()))  # a = 2, b = 2
    np.testing.assert_allclose(crow_spatial_weights(FEAT), expected, rtol=1e-6)
    np.testing.assert_allclose(crow_spatial_weights(FEAT, a=1, b=1), summed / summed.sum(), rtol=1e-6)
    np.testing.assert_array_equal(crow_spatial_weights(np.zeros((2, 2, 2), np.float32)), np.zeros((2, 2)))


def test_channel_weights_are_the_log_inverse_sparsity() -> None:
    # Q = [1, 1/4, 0]: sum 5/4; weights log(5/4 / 1), log(5/4 / (1/4)) = log 5, and 0 for the dead channel
    np.testing.assert_allclose(crow_channel_weights(FEAT), [np.log(1.25), np.log(5.0), 0.0], rtol=1e-6)


def test_crow_descriptor_combines_both() -> None:
    spatial = crow_spatial_weights(FEAT)
    expected = crow_channel_weights(FEAT) * (FEAT * spatial).sum(axis=(1, 2))
    np.testing.assert_allclose(crow(FEAT), expected, rtol=1e-6)


def test_cam_class_vectors_weight_features_by_the_scaled_cam() -> None:
    cams = np.array([[[0, 0], [0, 10]], [[2, 2], [2, 2]]], dtype=np.float32)  # a peak, and a constant map
    scaled = normalize_maps(cams)
    np.testing.assert_array_equal(scaled, [[[0, 0], [0, 1]], [[0, 0], [0, 0]]])  # constant -> zeros
    np.testing.assert_allclose(weighted_sums(FEAT, scaled), [[1, 4, 0], [0, 0, 0]])
    np.testing.assert_allclose(cam_class_vectors(FEAT, cams)[0], crow_channel_weights(FEAT) * [1, 4, 0], rtol=1e-6)
