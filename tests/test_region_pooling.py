"""Pooling inside cell ranges, boxes and masks (R-MAC, RPA-max, clusters): hand-worked 2-channel maps."""

import numpy as np
import pytest

from inserve.server.stages.pooling import box_max, cells_max, gem, mac, masked_max, masks_to_boxes, spoc

# channel 0 counts 0..5 over a 2x3 map, channel 1 is its mirror
FEAT = np.stack([np.arange(6.0).reshape(2, 3), np.arange(6.0)[::-1].reshape(2, 3)]).astype(np.float32)


def test_mac_spoc_gem_by_hand() -> None:
    np.testing.assert_array_equal(mac(FEAT), [5, 5])
    np.testing.assert_array_equal(spoc(FEAT), [15, 15])
    np.testing.assert_allclose(gem(FEAT, p=1.0), [2.5, 2.5], rtol=1e-6)  # p = 1: the mean
    expected = ((0 + 1 + 8 + 27 + 64 + 125) / 6) ** (1 / 3)
    np.testing.assert_allclose(gem(FEAT, p=3.0), [expected, expected], rtol=1e-5)


def test_cells_max_takes_the_max_inside_each_half_open_range() -> None:
    cells = np.array([[0, 0, 1, 1], [1, 0, 3, 2], [0, 1, 3, 2]])  # x0, y0, x1, y1
    np.testing.assert_array_equal(cells_max(FEAT, cells), [[0, 5], [5, 4], [5, 2]])


def test_box_max_maps_pixel_boxes_to_the_cells_whose_centres_they_cover() -> None:
    # stride 10: cell (x=1, y=0) has its centre at (15, 5); the box 10..20 x 0..10 covers exactly that cell
    np.testing.assert_array_equal(box_max(FEAT, np.array([[10, 0, 20, 10]]), stride=10), [[1, 4]])
    np.testing.assert_array_equal(box_max(FEAT, np.array([[0, 0, 30, 20]]), stride=10), [[5, 5]])


def test_masked_max_and_mask_boxes() -> None:
    masks = np.zeros((3, 2, 3), dtype=bool)
    masks[0, 0, 0] = masks[0, 1, 2] = True  # two disconnected cells: values 0 and 5 / 5 and 0
    masks[1, 1, :2] = True  # values 3, 4 / 2, 1
    np.testing.assert_array_equal(masked_max(FEAT, masks), [[5, 5], [4, 2], [0, 0]])
    np.testing.assert_array_equal(masks_to_boxes(masks, 10), [[0, 0, 30, 20], [0, 10, 20, 20], [0, 0, 0, 0]])


@pytest.mark.parametrize("p", [1.0, 3.0])
def test_gem_is_between_mean_and_max(p: float) -> None:
    x = np.random.default_rng(0).uniform(0, 1, (4, 5, 5)).astype(np.float32)
    assert np.all(gem(x, p) >= x.reshape(4, -1).mean(1) - 1e-6)
    assert np.all(gem(x, p) <= mac(x) + 1e-6)
