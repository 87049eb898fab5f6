"""Shape estimation of server/stages/shapes.py: thresholding, second-moment ellipse, box, clipping."""

from __future__ import annotations

import math

import numpy as np
import pytest

from inserve.server.stages.shapes import ellipse_box, map_boxes, support


def ellipse_mask(height: int, width: int, stride: int, centre: tuple[float, float], axes: tuple[float, float]):
    """Cells of a stride-`stride` grid whose centres lie in the ellipse (pixels: centre x, y; semi-axes a, b)."""
    ys, xs = np.mgrid[0:height, 0:width]
    cx, cy = (xs + 0.5) * stride, (ys + 0.5) * stride
    return ((cx - centre[0]) / axes[0]) ** 2 + ((cy - centre[1]) / axes[1]) ** 2 <= 1


def test_filled_ellipse_gives_its_bounding_rectangle() -> None:
    # a uniform ellipse with semi-axes a, b has variances a^2/4, b^2/4: its 2-sigma box is its bounding box
    mask = ellipse_mask(40, 50, 2, centre=(40.0, 30.0), axes=(24.0, 12.0))
    np.testing.assert_allclose(ellipse_box(mask, 2), [16, 18, 64, 42], atol=1.0)  # half a cell
    mask = ellipse_mask(80, 100, 1, centre=(50.3, 40.1), axes=(30.0, 15.0))
    np.testing.assert_allclose(ellipse_box(mask, 1), [20.3, 25.1, 80.3, 55.1], atol=0.5)


def test_uniform_rectangle_gives_the_rectangle_scaled_by_2_over_sqrt3() -> None:
    # cells x 3..8, y 2..5 at stride 8: the rectangle [24, 16, 72, 48]; a uniform segment of length L has
    # std L / sqrt(12), so the 2-sigma half-side is L / sqrt(3): the box is the rectangle scaled by 1.1547
    mask = np.zeros((8, 12), dtype=bool)
    mask[2:6, 3:9] = True
    half_w, half_h = 48 / math.sqrt(3), 32 / math.sqrt(3)
    np.testing.assert_allclose(ellipse_box(mask, 8), [48 - half_w, 32 - half_h, 48 + half_w, 32 + half_h], rtol=1e-6)


def test_single_cell_gives_a_box_about_one_stride_wide_around_its_centre() -> None:
    mask = np.zeros((5, 6), dtype=bool)
    mask[2, 3] = True
    # cell centre (28, 20); a cell's own extent adds s^2/12 to each variance: half-side 2 s / sqrt(12)
    half = 8 / math.sqrt(3)
    np.testing.assert_allclose(ellipse_box(mask, 8), [28 - half, 20 - half, 28 + half, 20 + half], rtol=1e-6)


def test_empty_mask_has_no_box() -> None:
    assert ellipse_box(np.zeros((3, 3), dtype=bool), 4) is None


def test_box_does_not_depend_on_where_the_mask_sits_in_the_map() -> None:
    mask = np.zeros((10, 10), dtype=bool)
    mask[1:4, 2:4] = True
    box = ellipse_box(mask, 4)
    shifted = ellipse_box(np.roll(mask, (3, 5), axis=(0, 1)), 4)
    np.testing.assert_allclose(shifted, box + np.array([20, 12, 20, 12]), rtol=1e-6)


def test_moments_support_keeps_values_at_or_above_tau_of_the_max() -> None:
    prob = np.array([[0, 0.25, 0.5], [1.0, 2.0, 0.49]])
    expected = np.array([[False, False, True], [True, True, False]])
    np.testing.assert_array_equal(support(prob, 0.25, "moments"), expected)
    np.testing.assert_array_equal(support(prob * 8, 0.25, "moments"), expected)  # scale-free: [0, 1] normalised


def test_moments_support_of_a_zero_map_is_empty() -> None:
    assert not support(np.zeros((4, 4)), 0.1, "moments").any()


def test_official_support_keeps_values_above_the_95th_percentile() -> None:
    prob = np.arange(100, dtype=np.float64).reshape(10, 10)
    kept = support(prob, 0.1, "official")  # tau is not used by the official variant
    assert sorted(prob[kept].tolist()) == [95, 96, 97, 98, 99]  # np.percentile(0..99, 95) = 94.05


def test_official_support_of_a_flat_map_is_empty() -> None:
    assert not support(np.ones((4, 4)), 0.1, "official").any()


def test_unknown_shape_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown shape estimation 'disc'"):
        support(np.ones((2, 2)), 0.1, "disc")


def test_map_boxes_clips_to_the_input_and_flags_maps_without_a_box() -> None:
    maps = np.zeros((4, 6, 8), dtype=np.float32)
    maps[0, 0, 0] = 1.0  # top-left cell: box [4 - h, 4 - h, 4 + h, 4 + h] with h = 8/sqrt(3), clipped at 0
    maps[1, 5, 7] = 1.0  # bottom-right cell of a 64 x 48 input: clipped at 64 and 48
    maps[3, 5, 7] = 1.0  # same cell, but the input is only 40 wide below: nothing left after clipping
    half = 8 / math.sqrt(3)
    boxes, valid = map_boxes(maps[:3], 8, 0.1, "moments", width=64, height=48)
    np.testing.assert_array_equal(valid, [True, True, False])  # maps[2] is all zero
    np.testing.assert_allclose(boxes[0], [0, 0, 4 + half, 4 + half], rtol=1e-6)
    np.testing.assert_allclose(boxes[1], [60 - half, 44 - half, 64, 48], rtol=1e-6)
    assert boxes.dtype == np.float32 and boxes.shape == (3, 4)
    boxes, valid = map_boxes(maps[3:], 8, 0.1, "moments", width=40, height=48)
    assert not valid[0]


def test_map_boxes_thresholds_each_map_on_its_own_max() -> None:
    maps = np.zeros((2, 4, 4), dtype=np.float32)
    maps[0, 1, 1], maps[0, 3, 3] = 1.0, 0.05  # 0.05 < tau: only the single cell counts
    maps[1, 1, 1], maps[1, 3, 3] = 1.0, 0.5  # both count: a wider box
    boxes, valid = map_boxes(maps, 4, 0.1, "moments", width=16, height=16)
    assert valid.all()
    half = 4 / math.sqrt(3)
    np.testing.assert_allclose(boxes[0], [6 - half, 6 - half, 6 + half, 6 + half], rtol=1e-6)
    assert boxes[1, 2] - boxes[1, 0] > boxes[0, 2] - boxes[0, 0]
