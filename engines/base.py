"""The one interface every runtime implements, and the options that pick and tune a runtime.

The server's stages only ever see an `Engine`: named arrays in, named arrays out. Which runtime
sits behind it (ONNX Runtime on a laptop CPU, TensorRT on a datacenter GPU or a Jetson) is a
deployment choice expressed once, in `EngineOptions`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

DEVICES = ("auto", "cpu", "cuda", "tensorrt", "tensorrt-native")

Shape = tuple[int, ...]
ShapeRange = tuple[Shape, Shape, Shape]


class EngineUnavailable(RuntimeError):
    """The requested runtime or device is not usable on this machine; the message says what is missing."""


@runtime_checkable
class Engine(Protocol):
    """A loaded graph that maps named input arrays to named output arrays.

    `run` must be safe to call from several threads at once: the server's batcher and its
    request handlers share one engine per graph.
    """

    name: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]

    def run(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Run the graph; `outputs=None` returns every output, otherwise only the named ones."""
        ...


@dataclass(frozen=True)
class EngineOptions:
    """How to run a graph.

    device: "auto" (TensorRT EP, else CUDA EP, else CPU), "cpu", "cuda" (ONNX Runtime's CUDA EP),
    "tensorrt" (ONNX Runtime's TensorRT EP) or "tensorrt-native" (a TensorRT plan built here).
    Thread counts of 0 leave the runtime's default. `fp16`, `workspace_bytes` and `profiles` tune
    TensorRT (EP or native) and are ignored elsewhere. `cache_dir` keeps TensorRT engines/plans
    between processes, since building one takes from seconds to minutes. `profiles` gives the
    (min, opt, max) shape of each dynamic input: TensorRT optimises for `opt` and rejects shapes
    outside [min, max].
    """

    device: str = "auto"
    device_id: int = 0
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    fp16: bool = False
    cache_dir: Path | None = None
    workspace_bytes: int = 2 << 30
    profiles: Mapping[str, ShapeRange] | None = None

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"unknown device {self.device!r}; expected one of {', '.join(DEVICES)}")
        for field in ("device_id", "intra_op_threads", "inter_op_threads", "workspace_bytes"):
            if getattr(self, field) < 0:
                raise ValueError(f"{field} must be >= 0, got {getattr(self, field)}")
        for name, shapes in (self.profiles or {}).items():
            _check_profile(name, shapes)


DEFAULT_OPTIONS = EngineOptions()


def _check_profile(name: str, shapes: ShapeRange) -> None:
    """Catch malformed profiles here, where the message can name the input, not deep in TensorRT."""
    if len(shapes) != 3:
        raise ValueError(f"profile for {name!r} needs (min, opt, max) shapes, got {len(shapes)} shapes")
    low, opt, high = shapes
    if not len(low) == len(opt) == len(high):
        raise ValueError(f"profile for {name!r}: min {low}, opt {opt} and max {high} differ in rank")
    if not all(0 <= a <= b <= c for a, b, c in zip(low, opt, high, strict=True)):
        raise ValueError(f"profile for {name!r}: need 0 <= min <= opt <= max per dim; got {low} {opt} {high}")
