"""How a batch's DASR seeds are spread over back-propagation runs: never more runs per image than alone
(the graph recomputes an image's forward pass in every run it is in), and every seed's map where it belongs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from inserve.server.stages.dasr import backpropagate_seeds, seed_runs


def runs_of(runs: list[tuple[list[int], int, int]], image: int) -> list[tuple[int, int]]:
    return [(start, slots) for images, start, slots in runs if image in images]


@pytest.mark.parametrize(
    "counts",
    [[74, 70, 85, 80, 68, 51, 70, 77], [3, 10, 8, 0, 5, 1], [48, 47, 1, 96, 2, 24, 24], [0, 0], [1]],
)
@pytest.mark.parametrize("per_run", [1, 6, 48])
def test_each_image_runs_as_often_as_alone_and_every_seed_once(counts: list[int], per_run: int) -> None:
    runs = seed_runs(counts, per_run)
    assert all(len(images) * slots <= per_run or len(images) == 1 for images, _, slots in runs)
    assert all(slots <= per_run for _, _, slots in runs)
    for image, count in enumerate(counts):
        mine = runs_of(runs, image)
        assert len(mine) == math.ceil(count / per_run)
        covered = [s for start, slots in mine for s in range(start, min(start + slots, count))]
        assert covered == list(range(count))


def test_many_seeds_run_image_by_image_and_few_share_a_run() -> None:
    """DASR* finds 50-90 seeds per image at 512 px: a batch of eight is eight images alone, not fifteen runs
    of all eight; DASR's few peaks share one run."""
    dasr_star = seed_runs([74, 70, 85, 80, 68, 51, 70, 77], 48)
    assert all(len(images) == 1 for images, _, _ in dasr_star) and len(dasr_star) == 16
    assert sum(slots for _, _, slots in dasr_star) == 74 + 70 + 85 + 80 + 68 + 51 + 70 + 77  # no padding rows
    assert seed_runs([3, 10, 8, 0, 5], 48) == [([1, 2, 4, 0], 0, 10)]


class LinearEngine:
    """Stands in for the back-propagation graph: row (b, s) is a map that encodes the image and the seed."""

    def __init__(self) -> None:
        self.runs: list[tuple[int, int]] = []

    def run(self, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        pixels, yx, value = inputs["image"], inputs["seed_yx"], inputs["seed_value"]
        self.runs.append(yx.shape[:2])
        code = pixels[:, 0, 0, 0][:, None] * 1000 + yx[..., 0] * 10 + yx[..., 1]
        return {"maps": np.broadcast_to((code * value)[..., None, None], (*yx.shape[:2], 4, 6)).astype(np.float32)}


def test_each_image_gets_the_maps_of_its_own_seeds_in_order() -> None:
    rng = np.random.default_rng(0)
    counts = [7, 0, 3, 12, 3]
    pixels = np.zeros((len(counts), 3, 8, 8), dtype=np.float32)
    pixels[:, 0, 0, 0] = np.arange(1, len(counts) + 1)
    seeds = [np.stack([rng.integers(0, 9, n), rng.integers(0, 9, n)], axis=1) for n in counts]
    engine = LinearEngine()
    maps = backpropagate_seeds(engine, pixels, seeds, per_run=8)
    for b, (image_seeds, image_maps) in enumerate(zip(seeds, maps)):
        assert image_maps.shape[0] == len(image_seeds)
        expected = (b + 1) * 1000 + image_seeds[:, 0] * 10 + image_seeds[:, 1]
        np.testing.assert_array_equal(image_maps[:, 0, 0], expected)
    assert sum(rows * slots for rows, slots in engine.runs) <= 8 * len(engine.runs)
    assert len(engine.runs) == len(seed_runs(counts, 8))
