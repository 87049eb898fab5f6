"""Where to start DASR back-propagation: peaks of the mean activation map of the last conv layer."""

from __future__ import annotations

import numpy as np


def mean_activation(feat: np.ndarray) -> np.ndarray:
    """(C, h, w) -> (h, w): the activation map of seed 004, the mean over channels."""
    return feat.mean(axis=0)


def local_maxima(activation: np.ndarray) -> np.ndarray:
    """DASR peaks: positions (N, 2) as (y, x) that are >= their 3x3 neighbours and > 0, best first.

    Plateaus keep their first position in raster order only, so a flat region gives one peak.
    """
    h, w = activation.shape
    padded = np.pad(activation, 1, constant_values=-np.inf)
    is_peak = activation > 0
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy == 0 and dx == 0:
                continue
            neighbour = padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
            earlier = dy < 0 or (dy == 0 and dx < 0)  # ties lose to a neighbour that comes first
            is_peak &= (activation > neighbour) if earlier else (activation >= neighbour)
    return _by_value(activation, np.argwhere(is_peak))


def above_mean(activation: np.ndarray) -> np.ndarray:
    """DASR* candidates: every position (y, x) whose activation exceeds the map's mean, best first."""
    return _by_value(activation, np.argwhere(activation > activation.mean()))


def every_cell(activation: np.ndarray) -> np.ndarray:
    """Every position (y, x) of the map, best first: the widest choice of DASR* seeds."""
    return _by_value(activation, np.argwhere(np.ones(activation.shape, dtype=bool)))


def _by_value(activation: np.ndarray, positions: np.ndarray) -> np.ndarray:
    values = activation[positions[:, 0], positions[:, 1]]
    order = np.lexsort((positions[:, 1], positions[:, 0], -values))
    return positions[order].astype(np.int64)
