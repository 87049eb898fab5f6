"""TensorRT optimisation profiles derived from what the server will feed a graph, not typed by hand.

A TensorRT engine accepts only the shapes its profiles cover and is fastest at each profile's `opt` shape. The
server feeds every graph the same few shapes: images padded into its shape buckets (server/stages/buckets.py),
batches of 1 to max_batch, DASR seeds 1 to seeds_per_run. So each graph gets one profile per bucket, derived
from the symbolic dims its ONNX inputs carry (recorded in the bundle's manifest at export): "batch",
"32*rows" (pixels: the grid multiple times the bucket's rows), "4*rows" (a map at stride 8), "feat_rows" (the
feature map) and "seeds".
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from inserve.engines.base import Shape, ShapeRange

Profile = dict[str, ShapeRange]
_GRID = re.compile(r"^(?:(\d+)\*)?(rows|cols)$")


@dataclass(frozen=True)
class ShapePlan:
    """The shapes a server feeds its graphs. `buckets` are (height, width) in network pixels, multiples of
    `size_multiple`; the feature map has stride `feat_stride`."""

    buckets: tuple[tuple[int, int], ...]
    size_multiple: int
    feat_stride: int
    max_batch: int
    max_seeds: int

    def __post_init__(self) -> None:
        if not self.buckets:
            raise ValueError("a shape plan needs at least one bucket")
        for height, width in self.buckets:
            if height % self.size_multiple or width % self.size_multiple:
                raise ValueError(f"bucket {height}x{width} is not on the {self.size_multiple}-pixel grid")
        if self.max_batch < 1 or self.max_seeds < 1:
            raise ValueError(f"max_batch and max_seeds must be >= 1, got {self.max_batch}, {self.max_seeds}")


def _dim_range(dim: int | str, bucket: tuple[int, int], plan: ShapePlan, where: str) -> tuple[int, int, int]:
    """(min, opt, max) of one input dim for one bucket."""
    if isinstance(dim, int):
        return dim, dim, dim
    if dim == "batch":
        return 1, plan.max_batch, plan.max_batch
    if dim == "seeds":
        return 1, plan.max_seeds, plan.max_seeds
    height, width = bucket
    if dim in ("feat_rows", "feat_cols"):
        cells = (height if dim == "feat_rows" else width) // plan.feat_stride
        return cells, cells, cells
    grid = _GRID.match(dim)
    if grid is None:
        raise ValueError(
            f"{where}: no rule derives a TensorRT profile for the dim {dim!r}; a bundle exported by another inserve "
            "version (e.g. a moments graph with a symbolic 'k') needs `inserve export` again"
        )
    multiple = int(grid.group(1) or 1)
    cells = (height if grid.group(2) == "rows" else width) // plan.size_multiple
    return (multiple * cells,) * 3


def graph_profiles(
    inputs: Mapping[str, Sequence[int | str]], plan: ShapePlan, graph: str = "graph"
) -> tuple[Profile, ...]:
    """One profile per bucket for a graph whose inputs have these dims (ints or symbolic names)."""
    profiles = []
    for bucket in plan.buckets:
        profile: Profile = {}
        for name, dims in inputs.items():
            ranges = [_dim_range(d, bucket, plan, f"{graph} input {name!r}") for d in dims]
            low, opt, high = (tuple(r[i] for r in ranges) for i in range(3))
            profile[name] = (low, opt, high)
        profiles.append(profile)
    return tuple(profiles)


def covering_profile(profiles: Sequence[Profile], shapes: Mapping[str, Shape]) -> int | None:
    """Index of the first profile whose [min, max] holds every input's shape (None: none does)."""
    for index, profile in enumerate(profiles):
        if all(
            len(shape) == len(profile[name][0])
            and all(lo <= d <= hi for lo, d, hi in zip(profile[name][0], shape, profile[name][2]))
            for name, shape in shapes.items()
        ):
            return index
    return None
