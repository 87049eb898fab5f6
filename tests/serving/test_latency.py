"""The latency histogram the metrics endpoint reads: hand-checked buckets, sums and thread safety."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

from inserve.server.latency import LatencyHistogram


def test_observations_fall_in_the_first_bucket_that_holds_them_and_counts_are_cumulative() -> None:
    histogram = LatencyHistogram((1.0, 0.1, 0.5))
    for seconds in (0.05, 0.1, 0.3, 0.5, 0.7, 3.0):
        histogram.observe(seconds)
    buckets, total = histogram.snapshot()
    assert buckets == [(0.1, 2), (0.5, 4), (1.0, 5), (math.inf, 6)]  # upper bounds are inclusive
    assert total == sum((0.05, 0.1, 0.3, 0.5, 0.7, 3.0))


def test_concurrent_observations_are_all_counted() -> None:
    histogram = LatencyHistogram((0.5,))
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: histogram.observe(i % 2), range(8000)))
    buckets, total = histogram.snapshot()
    assert buckets == [(0.5, 4000), (math.inf, 8000)] and total == 4000
