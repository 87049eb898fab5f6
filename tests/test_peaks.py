"""Peak finders of server/stages/peaks.py on small hand-made maps."""

from __future__ import annotations

import numpy as np

from inserve.server.stages.peaks import above_mean, local_maxima, mean_activation


def positions(found: np.ndarray) -> list[tuple[int, int]]:
    return [(int(y), int(x)) for y, x in found]


def test_mean_activation_is_the_channel_mean() -> None:
    feat = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    np.testing.assert_allclose(mean_activation(feat), (feat[0] + feat[1]) / 2)


def test_strict_local_maxima_best_first() -> None:
    a = np.array(
        [
            [0, 0, 0, 0, 0],
            [0, 5, 0, 0, 0],
            [0, 0, 0, 0, 0],
            [0, 0, 0, 7, 0],
            [0, 0, 0, 0, 0],
        ],
        dtype=np.float32,
    )
    assert positions(local_maxima(a)) == [(3, 3), (1, 1)]


def test_border_and_corner_peaks_count() -> None:
    a = np.array(
        [
            [9, 1, 0, 2],
            [1, 0, 0, 1],
            [0, 0, 0, 0],
            [0, 3, 0, 4],
        ],
        dtype=np.float32,
    )
    # (0,0) corner, (0,3) corner, (3,1) bottom border, (3,3) corner: all beat their in-map neighbours
    assert positions(local_maxima(a)) == [(0, 0), (3, 3), (3, 1), (0, 3)]


def test_a_neighbour_that_is_higher_is_not_a_peak() -> None:
    a = np.array([[1, 2, 3], [2, 3, 4], [3, 4, 5]], dtype=np.float32)
    assert positions(local_maxima(a)) == [(2, 2)]


def test_plateau_gives_one_peak_at_its_first_raster_position() -> None:
    a = np.array(
        [
            [0, 0, 0, 0],
            [0, 4, 4, 0],
            [0, 4, 4, 0],
            [0, 0, 0, 1],
        ],
        dtype=np.float32,
    )
    assert positions(local_maxima(a)) == [(1, 1)]


def test_plateau_touching_a_higher_value_gives_no_peak() -> None:
    a = np.array([[2, 2, 0], [0, 3, 0]], dtype=np.float32)
    assert positions(local_maxima(a)) == [(1, 1)]


def test_maxima_are_judged_on_the_3x3_window_only() -> None:
    # (0,0) never sees the 3 two columns away, so it is a peak of its own window
    a = np.array([[2, 2, 3], [0, 0, 0]], dtype=np.float32)
    assert positions(local_maxima(a)) == [(0, 2), (0, 0)]


def test_zero_and_negative_maps_have_no_peaks() -> None:
    assert local_maxima(np.zeros((3, 3), dtype=np.float32)).shape == (0, 2)
    a = -np.ones((3, 3), dtype=np.float32)
    a[1, 1] = -0.5
    assert local_maxima(a).shape == (0, 2)


def test_single_cell_map() -> None:
    assert positions(local_maxima(np.array([[2.0]], dtype=np.float32))) == [(0, 0)]


def test_peak_positions_are_int64_pairs() -> None:
    found = local_maxima(np.array([[0, 1], [0, 0]], dtype=np.float32))
    assert found.dtype == np.int64 and found.shape == (1, 2)


def test_above_mean_keeps_every_position_above_the_mean() -> None:
    # mean = (1 + 2 + 3 + 6) / 4 = 3: only 6 is strictly above; 3 equals the mean and is left out
    a = np.array([[1, 2], [3, 6]], dtype=np.float32)
    assert positions(above_mean(a)) == [(1, 1)]


def test_above_mean_orders_by_value_then_raster() -> None:
    a = np.array(
        [
            [0, 5, 0],
            [5, 0, 9],
            [0, 0, 5],
        ],
        dtype=np.float32,
    )
    # mean = 24 / 9 = 2.67; ties (5) keep raster order
    assert positions(above_mean(a)) == [(1, 2), (0, 1), (1, 0), (2, 2)]


def test_above_mean_of_a_flat_map_is_empty() -> None:
    assert above_mean(np.full((4, 4), 3.0, dtype=np.float32)).shape == (0, 2)


def test_above_mean_is_a_superset_of_the_positive_local_maxima_above_the_mean() -> None:
    rng = np.random.default_rng(0)
    a = rng.random((7, 9)).astype(np.float32)
    star = set(positions(above_mean(a)))
    for y, x in positions(local_maxima(a)):
        if a[y, x] > a.mean():
            assert (y, x) in star
