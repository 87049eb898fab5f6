"""The R-MAC grid against cnnimageretrieval-pytorch's layout, worked by hand for small maps."""

import numpy as np

from inserve.server.stages.rmac import cells_to_boxes, rmac_grid


def test_square_map_has_the_whole_map_then_1_4_9_squares() -> None:
    regions = rmac_grid(6, 6, levels=3)
    assert len(regions) == 1 + 1 + 4 + 9
    np.testing.assert_array_equal(regions[0], [0, 0, 6, 6])
    np.testing.assert_array_equal(regions[1], [0, 0, 6, 6])  # level 1: side 2*6/2 = 6
    # level 2: side floor(2*6/3) = 4, two positions per axis at 0 and 2 (step (6-4)/1)
    np.testing.assert_array_equal(regions[2:6], [[0, 0, 4, 4], [2, 0, 6, 4], [0, 2, 4, 6], [2, 2, 6, 6]])
    # level 3: side floor(12/4) = 3, positions 0, 1.5 -> 1, 3
    xs = sorted({int(r[0]) for r in regions[6:]})
    assert xs == [0, 1, 3] and all(r[2] - r[0] == 3 for r in regions[6:])


def test_wide_map_adds_windows_along_the_long_side_with_about_40_percent_overlap() -> None:
    regions = rmac_grid(4, 7, levels=2)
    # w = 4; b = (7-4)/(steps-1); overlap (16 - 4b)/16 closest to 0.4 at steps = 2 (b = 3, overlap 0.25) vs
    # steps = 3 (b = 1.5, 0.625): |0.25-0.4| = 0.15 < 0.225, so one extra window along x
    level1 = regions[1:3]
    np.testing.assert_array_equal(level1, [[0, 0, 4, 4], [3, 0, 7, 4]])
    level2 = regions[3:]
    assert len(level2) == 3 * 2  # 2 + 1 windows along x, 2 along y, side floor(8/3) = 2
    assert all(r[2] - r[0] == 2 and r[3] - r[1] == 2 for r in level2)
    assert all(r[0] >= 0 and r[2] <= 7 and r[1] >= 0 and r[3] <= 4 for r in regions)


def test_tall_map_is_the_transpose_of_the_wide_one() -> None:
    wide = rmac_grid(4, 7, levels=3)
    tall = rmac_grid(7, 4, levels=3)
    np.testing.assert_array_equal(sorted(map(tuple, tall[:, [1, 0, 3, 2]])), sorted(map(tuple, wide)))


def test_cells_to_boxes_scales_and_clips() -> None:
    np.testing.assert_array_equal(cells_to_boxes(np.array([[0, 1, 2, 3]]), 32, 50, 200), [[0, 32, 50, 96]])
