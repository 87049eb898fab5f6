"""Pooling of server/stages/pooling.py: GeM/MAC/SPoC, box cells and box averages, l2 normalisation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from inserve.server.stages.pooling import box_average, box_cells, gem, l2_normalize, mac, spoc

FEAT = np.array(
    [
        [[1, 2], [3, 4]],
        [[0, 0], [0, 8]],
        [[5, 5], [5, 5]],
    ],
    dtype=np.float32,
)


def test_mac_and_spoc_by_hand() -> None:
    np.testing.assert_array_equal(mac(FEAT), [4, 8, 5])
    np.testing.assert_array_equal(spoc(FEAT), [10, 8, 20])


def test_gem_p1_is_the_mean() -> None:
    np.testing.assert_allclose(gem(FEAT, p=1.0), [2.5, 2.0, 5.0], rtol=1e-5)


def test_gem_p3_by_hand() -> None:
    # channel 0: ((1 + 8 + 27 + 64) / 4)^(1/3) = 25^(1/3); channel 1: (512 / 4)^(1/3) = 128^(1/3)
    np.testing.assert_allclose(gem(FEAT, p=3.0), [25 ** (1 / 3), 128 ** (1 / 3), 5.0], rtol=1e-5)


def test_gem_large_p_approaches_max_and_grows_with_p() -> None:
    rng = np.random.default_rng(0)
    feat = rng.random((6, 5, 7)).astype(np.float32)
    np.testing.assert_allclose(gem(feat, p=500.0), mac(feat), rtol=1e-2)  # within (1/35)^(1/500) of the max
    values = [gem(feat, p) for p in (1.0, 2.0, 3.0, 10.0, 100.0)]
    for lower, higher in itertools.pairwise(values):
        assert np.all(higher >= lower - 1e-6)
    assert np.all(values[-1] <= mac(feat) + 1e-6)


def test_gem_clamps_negatives_to_eps() -> None:
    feat = np.array([[[-1.0, -2.0]], [[-1.0, 8.0]]], dtype=np.float32)
    out = gem(feat, p=3.0, eps=1e-6)
    assert out[0] == pytest.approx(1e-6, rel=1e-3)
    assert out[1] == pytest.approx((512 / 2) ** (1 / 3), rel=1e-5)
    assert out.dtype == np.float32


def brute_cells(box: np.ndarray, stride: int, height: int, width: int) -> tuple[list[int], list[int]]:
    """Rows and columns whose cell centres ((i + 0.5) * stride) the box covers, inside the map; when there
    are none, the map cell nearest to the box centre."""

    def axis(lo: float, hi: float, n: int) -> list[int]:
        covered = [i for i in range(n) if lo <= (i + 0.5) * stride <= hi]
        if covered:
            return covered
        return [int(np.clip(np.floor((lo + hi) / (2 * stride)), 0, n - 1))]

    return axis(box[1], box[3], height), axis(box[0], box[2], width)


def test_box_cells_by_hand() -> None:
    # stride 8: cell centres 4, 12, 20, 28, ...
    boxes = np.array(
        [
            [0, 0, 32, 16],  # centres 4..28 in x, 4..12 in y
            [5, 5, 11, 11],  # covers no centre: the cell of its centre (8, 8) -> cell 1
            [4, 4, 12, 12],  # centres on the edges count
            [-20, -20, 2, 2],  # outside to the top-left: cell 0
            [100, 10, 200, 20],  # beyond the right edge of a 6-wide map: last column; rows 1-2 (centre 20 on the edge)
        ]
    )
    cells = box_cells(boxes, 8, height=4, width=6)
    np.testing.assert_array_equal(
        cells,
        [[0, 0, 4, 2], [1, 1, 2, 2], [0, 0, 2, 2], [0, 0, 1, 1], [5, 1, 6, 3]],
    )


def test_box_cells_and_box_average_match_a_brute_force_loop() -> None:
    rng = np.random.default_rng(1)
    stride, height, width = 16, 5, 7
    desc = rng.normal(size=(4, height, width)).astype(np.float32)
    corners = rng.uniform(-30, width * stride + 30, size=(300, 2, 2))
    sizes = rng.uniform(0, 60, size=(300, 2))
    boxes = np.concatenate([corners[:, 0], corners[:, 0] + sizes], axis=1)
    cells = box_cells(boxes, stride, height, width)
    averages = box_average(desc, boxes, stride)
    for box, (x0, y0, x1, y1), average in zip(boxes, cells, averages):
        rows, cols = brute_cells(box, stride, height, width)
        assert (y0, y1, x0, x1) == (rows[0], rows[-1] + 1, cols[0], cols[-1] + 1), box
        expected = desc[:, rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].mean(axis=(1, 2))
        np.testing.assert_allclose(average, expected, rtol=1e-5, atol=1e-6)


def test_box_average_of_the_whole_map_is_the_mean() -> None:
    desc = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    out = box_average(desc, np.array([[0, 0, 4 * 8, 3 * 8]]), 8)
    np.testing.assert_allclose(out, desc.mean(axis=(1, 2))[None])
    assert out.shape == (1, 2) and out.dtype == np.float32


def test_l2_normalize() -> None:
    x = np.array([[3.0, 4.0], [0.0, 0.0], [1e-3, 0.0]])
    out = l2_normalize(x)
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0], [1.0, 0.0]], rtol=1e-6)
    assert out.dtype == np.float32
    np.testing.assert_allclose(l2_normalize(np.array([0.0, 2.0])), [0.0, 1.0])
