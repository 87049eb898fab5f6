"""Second-stage maths: best region, re-ranking order, query expansion, part sums."""

import numpy as np

from inserve.server.stages.components import largest_component, threshold_boxes
from inserve.server.stages.matching import best_region, expand_query, rerank_order, sum_normalized


def test_best_region() -> None:
    regions = np.array([[1, 0], [0.6, 0.8], [0, 1]], dtype=np.float32)
    assert best_region(np.array([0.0, 1.0]), regions) == (2, 1.0)
    i, sim = best_region(np.array([0.6, 0.8]), regions)
    assert i == 1 and abs(sim - 1.0) < 1e-6
    assert best_region(np.array([1.0, 0.0]), np.zeros((0, 2)))[0] == -1


def test_rerank_order_resorts_only_the_top() -> None:
    first = np.array([0.9, 0.8, 0.7, 0.6])
    second = np.array([0.1, 0.5, 0.3])  # re-scores of the top 3
    np.testing.assert_array_equal(rerank_order(first, second, 3), [1, 2, 0, 3])
    np.testing.assert_array_equal(rerank_order(first, np.array([0.2, 0.2]), 2), [0, 1, 2, 3])  # stable


def test_query_expansion_is_the_normalised_sum() -> None:
    q = np.array([1.0, 0.0])
    top = np.array([[0.0, 1.0], [0.0, 1.0]])
    np.testing.assert_allclose(expand_query(q, top), np.array([1, 2]) / np.sqrt(5), rtol=1e-6)
    np.testing.assert_allclose(expand_query(q, np.zeros((0, 2))), q)


def test_sum_normalized_normalises_parts_first() -> None:
    parts = np.array([[3.0, 0.0], [0.0, 0.5]])
    np.testing.assert_allclose(sum_normalized(parts), np.array([1, 1]) / np.sqrt(2), rtol=1e-6)


def test_threshold_boxes_take_the_largest_component() -> None:
    heat = np.zeros((4, 6), dtype=np.float32)
    heat[0, 0] = 1.0  # the peak, alone
    heat[2:4, 2:6] = 0.3  # a larger, weaker blob
    boxes = threshold_boxes(heat, (0.2, 0.5), stride=10)
    # 20 %: the blob (8 cells) beats the single peak; 50 %: only the peak
    np.testing.assert_array_equal(boxes, [[20, 20, 60, 40], [0, 0, 10, 10]])
    mask = np.array([[1, 0, 1], [1, 0, 0]], dtype=bool)
    np.testing.assert_array_equal(largest_component(mask), [[1, 0, 0], [1, 0, 0]])
