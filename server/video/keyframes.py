"""Keyframe selection: shot cuts from small colour histograms, within a minimum and maximum interval."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from inserve.server.config import VideoConfig


def colour_histogram(rgb: np.ndarray, bins: int = 8) -> np.ndarray:
    """(h, w, 3) uint8 -> the frame's bins^3 RGB histogram, summing to 1."""
    quantised = (rgb.reshape(-1, 3).astype(np.int64) * bins) >> 8
    codes = (quantised[:, 0] * bins + quantised[:, 1]) * bins + quantised[:, 2]
    counts = np.bincount(codes, minlength=bins**3).astype(np.float64)
    return counts / max(counts.sum(), 1.0)


def chi_square(a: np.ndarray, b: np.ndarray) -> float:
    """Symmetric chi-square distance of two normalised histograms: 0 = equal, 1 = disjoint."""
    total = a + b
    nonzero = total > 0
    return float(0.5 * np.sum((a[nonzero] - b[nonzero]) ** 2 / total[nonzero]))


@dataclass(frozen=True)
class SelectionRules:
    """Defaults live in VideoConfig; a request may override them."""

    scene_threshold: float  # chi-square distance to the previous frame that starts a new shot
    min_interval_s: float
    max_interval_s: float
    iframes_only: bool  # only the codec's intra frames may become keyframes

    @staticmethod
    def defaults(config: VideoConfig) -> SelectionRules:
        return SelectionRules(config.scene_threshold, config.min_interval_s, config.max_interval_s, config.iframes_only)

    def __post_init__(self) -> None:
        if math.isnan(self.min_interval_s) or math.isnan(self.max_interval_s):
            raise ValueError(f"intervals must be numbers, got {self.min_interval_s}, {self.max_interval_s}")
        if not 0 < self.scene_threshold <= 1:
            raise ValueError(f"scene threshold must be in (0, 1], got {self.scene_threshold}")
        if self.min_interval_s < 0 or self.max_interval_s <= 0 or self.min_interval_s > self.max_interval_s:
            raise ValueError(
                f"need 0 <= min interval <= max interval, max > 0; got {self.min_interval_s}, {self.max_interval_s}"
            )


class KeyframeSelector:
    """Feed frames in time order; a frame becomes a keyframe when it is the first of a shot (or the first
    one at least min_interval_s after the last keyframe, when the cut came sooner), or when
    max_interval_s have passed since the last keyframe."""

    def __init__(self, rules: SelectionRules) -> None:
        self.rules = rules
        self.shot = 0
        self._previous: np.ndarray | None = None
        self._last_time: float | None = None
        self._pending = True  # the current shot has no keyframe yet

    def resume(self, last_time_s: float, shot: int) -> None:
        """Continue after a keyframe stored earlier (a live stream reopened): the next one comes a min interval
        after it at the earliest, a max interval at the latest, or at the next cut."""
        self.shot, self._last_time, self._pending = shot, last_time_s, False

    def offer(self, time_s: float, histogram: np.ndarray, intra: bool = True) -> bool:
        """Whether this frame is a keyframe; `self.shot` is then its shot number."""
        if self._previous is not None and chi_square(histogram, self._previous) > self.rules.scene_threshold:
            self.shot += 1
            self._pending = True
        self._previous = histogram
        if self.rules.iframes_only and not intra:
            return False
        since = None if self._last_time is None else time_s - self._last_time
        if since is not None and since < self.rules.min_interval_s:
            return False
        if self._pending or since is None or since >= self.rules.max_interval_s:
            self._pending = False
            self._last_time = time_s
            return True
        return False
