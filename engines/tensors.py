"""Checks of a `run` call against the graph's declared inputs and outputs, shared by all engines.

Runtimes report a bad feed in their own words (or, for TensorRT, by reading garbage memory);
checking here first gives every engine the same ValueError that says which tensor is wrong and how.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TensorSpec:
    """A graph input: `dtype` None means a type numpy cannot hold (no check); a `None` dim is dynamic."""

    name: str
    dtype: np.dtype | None
    shape: tuple[int | None, ...]

    def describe(self) -> str:
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name}: {self.dtype or 'any'}[{dims}]"


def check_inputs(specs: Sequence[TensorSpec], inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Return the feed as C-contiguous arrays in graph order, or raise ValueError naming the problem."""
    expected = {spec.name for spec in specs}
    unknown = sorted(set(inputs) - expected)
    missing = sorted(expected - set(inputs))
    if unknown or missing:
        problems = [f"unknown input {name!r}" for name in unknown]
        problems += [f"missing input {name!r}" for name in missing]
        declared = "; ".join(spec.describe() for spec in specs)
        raise ValueError(f"{', '.join(problems)}; the graph's inputs are {declared}")
    return {spec.name: _check_one(spec, np.asarray(inputs[spec.name])) for spec in specs}


def _check_one(spec: TensorSpec, array: np.ndarray) -> np.ndarray:
    if spec.dtype is not None and array.dtype != spec.dtype:
        raise ValueError(f"input {spec.name!r} has dtype {array.dtype}; the graph expects {spec.describe()}")
    if array.ndim != len(spec.shape):
        raise ValueError(
            f"input {spec.name!r} has shape {array.shape} (rank {array.ndim}); "
            f"the graph expects rank {len(spec.shape)}: {spec.describe()}"
        )
    for axis, (got, want) in enumerate(zip(array.shape, spec.shape, strict=True)):
        if want is not None and got != want:
            raise ValueError(
                f"input {spec.name!r} has shape {array.shape}; dim {axis} must be {want}: {spec.describe()}"
            )
    return np.ascontiguousarray(array)


def check_outputs(output_names: Sequence[str], requested: Sequence[str] | None) -> tuple[str, ...]:
    """The outputs to return: all of them for None, else the requested ones, which must exist."""
    if requested is None:
        return tuple(output_names)
    if isinstance(requested, str):
        raise ValueError(f"outputs must be a sequence of names, not the string {requested!r}")
    unknown = [name for name in requested if name not in output_names]
    if unknown:
        raise ValueError(f"unknown output(s) {unknown}; the graph's outputs are {list(output_names)}")
    return tuple(requested)
