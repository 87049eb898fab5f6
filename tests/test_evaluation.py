"""Retrieval measures of server/evaluation.py, hand-computed (the revisited Oxford/Paris conventions)."""

from __future__ import annotations

import pytest

from inserve.server.evaluation import average_precision, precision_at


def test_perfect_ranking_has_ap_1() -> None:
    assert average_precision(["a", "b", "x", "y"], {"a", "b"}, set()) == 1.0


def test_ap_by_hand() -> None:
    # positives at ranks 1, 3, 4: (1/1 + 2/3 + 3/4) / 3
    ranked = ["a", "x", "b", "c", "y"]
    assert average_precision(ranked, {"a", "b", "c"}, set()) == pytest.approx((1 + 2 / 3 + 3 / 4) / 3)


def test_junk_is_removed_from_the_ranking() -> None:
    # without the junk j: a@1, x@2, b@3, c@4 -> (1 + 2/3 + 3/4) / 3, the same as above
    ranked = ["j", "a", "x", "j2", "b", "c"]
    assert average_precision(ranked, {"a", "b", "c"}, {"j", "j2"}) == pytest.approx((1 + 2 / 3 + 3 / 4) / 3)


def test_unretrieved_positives_count_zero() -> None:
    # z is never returned: (1/1 + 2/3) / 3
    assert average_precision(["a", "x", "b"], {"a", "b", "z"}, set()) == pytest.approx((1 + 2 / 3) / 3)
    assert average_precision(["x", "y"], {"a"}, set()) == 0.0


def test_query_without_positives_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one positive"):
        average_precision(["a"], set(), set())


def test_precision_at_k_by_hand() -> None:
    ranked = ["a", "j", "x", "b", "y", "c"]
    positives, junk = {"a", "b", "c"}, {"j"}
    # junk removed: a x b y c
    assert precision_at(ranked, positives, junk, 1) == 1.0
    assert precision_at(ranked, positives, junk, 3) == pytest.approx(2 / 3)
    assert precision_at(ranked, positives, junk, 5) == pytest.approx(3 / 5)
    # a short ranking still divides by k
    assert precision_at(ranked, positives, junk, 10) == pytest.approx(3 / 10)
