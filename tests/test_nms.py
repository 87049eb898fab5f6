"""box_iou and greedy NMS of server/stages/nms.py, on boxes worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from inserve.server.stages.nms import box_iou, nms


@pytest.mark.parametrize(
    ("a", "b", "iou"),
    [
        ([0, 0, 10, 10], [0, 0, 10, 10], 1.0),
        ([0, 0, 10, 10], [5, 5, 15, 15], 25 / 175),  # overlap 5x5, union 100 + 100 - 25
        ([0, 0, 10, 10], [0, 0, 10, 5], 0.5),  # contained half
        ([0, 0, 10, 10], [2, 2, 4, 4], 4 / 100),  # contained, small
        ([0, 0, 10, 10], [10, 0, 20, 10], 0.0),  # touching edges
        ([0, 0, 10, 10], [20, 20, 30, 30], 0.0),  # apart
        ([0, 0, 4, 2], [1, -1, 3, 5], 4 / 16),  # crossing: overlap 2x2, union 8 + 12 - 4
        ([5, 5, 5, 5], [5, 5, 5, 5], 0.0),  # degenerate: no area, no division by zero
    ],
)
def test_box_iou_by_hand(a: list[float], b: list[float], iou: float) -> None:
    assert box_iou(np.array(a), np.array(b))[0, 0] == pytest.approx(iou)
    assert box_iou(np.array(b), np.array(a))[0, 0] == pytest.approx(iou)


def test_box_iou_matrix_shape() -> None:
    a = np.array([[0, 0, 10, 10], [5, 5, 15, 15]])
    b = np.array([[0, 0, 10, 10], [0, 0, 10, 5], [100, 100, 110, 110]])
    expected = [[1.0, 0.5, 0.0], [25 / 175, 0.0, 0.0]]  # [5, 5, 15, 15] only touches [0, 0, 10, 5]
    np.testing.assert_allclose(box_iou(a, b), expected)


def test_box_iou_of_empty_sets() -> None:
    assert box_iou(np.zeros((0, 4)), np.array([0, 0, 1, 1])).shape == (0, 1)


BOXES = np.array([[0, 0, 10, 10], [0, 0, 10, 5], [20, 20, 30, 30], [21, 20, 31, 30]], dtype=np.float32)
SCORES = np.array([0.9, 0.8, 0.7, 0.95])
# IoU(0, 1) = 0.5; IoU(2, 3) = 90 / 110 = 0.818; the two pairs do not overlap


def test_nms_keeps_a_box_whose_iou_equals_the_threshold() -> None:
    assert nms(BOXES, SCORES, 0.5).tolist() == [3, 0, 1]


def test_nms_suppresses_a_box_just_above_the_threshold() -> None:
    assert nms(BOXES, SCORES, 0.49).tolist() == [3, 0]


def test_nms_keeps_everything_at_iou_1_and_only_the_best_of_each_cluster_at_0() -> None:
    assert nms(BOXES, SCORES, 1.0).tolist() == [3, 0, 1, 2]
    assert nms(BOXES, SCORES, 0.0).tolist() == [3, 0]


def test_nms_suppression_is_greedy_not_transitive() -> None:
    # a (best) suppresses b; c overlaps b but not a, so c survives because b was removed first
    boxes = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [10, 0, 20, 10]], dtype=np.float32)
    assert nms(boxes, np.array([3.0, 2.0, 1.0]), 0.3).tolist() == [0, 2]


def test_nms_equal_scores_keep_input_order() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [50, 50, 60, 60]], dtype=np.float32)
    assert nms(boxes, np.array([1.0, 1.0, 1.0]), 0.3).tolist() == [0, 2]


def test_nms_of_nothing() -> None:
    kept = nms(np.zeros((0, 4), dtype=np.float32), np.zeros(0), 0.3)
    assert kept.shape == (0,) and kept.dtype == np.int64
