"""A thread-safe latency histogram with fixed buckets, which the core fills and the metrics endpoint reads."""

from __future__ import annotations

import bisect
import math
import threading


class LatencyHistogram:
    """Counts of observed seconds per bucket (upper bounds, the last one infinite) and their sum."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = (*sorted(b for b in bounds if b != math.inf), math.inf)
        self._counts = [0] * len(self.bounds)
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, seconds: float) -> None:
        with self._lock:
            self._counts[bisect.bisect_left(self.bounds, seconds)] += 1
            self._sum += seconds

    def snapshot(self) -> tuple[list[tuple[float, int]], float]:
        """Cumulative (upper bound, count of observations at or below it) per bucket, and the sum."""
        with self._lock:
            counts, total = list(self._counts), self._sum
        cumulative, running = [], 0
        for bound, count in zip(self.bounds, counts):
            running += count
            cumulative.append((bound, running))
        return cumulative, total
