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


PRECISIONS = ("fp32", "fp16", "int8")  # what TensorRT may compute in (ONNX Runtime's CPU and CUDA EPs: fp32)


@dataclass(frozen=True)
class EngineOptions:
    """How to run a graph.

    device: "auto" (TensorRT EP, else CUDA EP, else CPU), "cpu", "cuda" (ONNX Runtime's CUDA EP),
    "tensorrt" (ONNX Runtime's TensorRT EP) or "tensorrt-native" (a TensorRT plan built here).
    Thread counts of 0 leave the runtime's default. `cpu_arena` keeps ONNX Runtime's CPU memory arena, which
    grows to the largest working set of every input shape it has run and keeps it (bench/churn_memory.py: a
    server with the default recipes peaks at about 1.1 GiB with it and 0.6 GiB without, each index, search
    and delete taking about 16% longer without). The rest tunes TensorRT (EP or native) and is ignored
    elsewhere: `precision` ("int8" needs `calibration`, a folder of images, and applies to graphs whose one
    input is the image; others build in fp16), `workspace_bytes`, `dla_core` (a Jetson's deep-learning
    accelerator, the GPU taking the layers it cannot run), and `profiles`: for each optimisation profile,
    the (min, opt, max) shape of each dynamic input; TensorRT optimises for `opt` and rejects shapes outside
    every profile's [min, max] (the server derives them per graph: engines/profiles.py). `cache_dir` keeps
    TensorRT engines/plans and timing caches between processes, since building one takes minutes.
    """

    device: str = "auto"
    device_id: int = 0
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    cpu_arena: bool = True
    precision: str = "fp32"
    cache_dir: Path | None = None
    workspace_bytes: int = 2 << 30
    profiles: Sequence[Mapping[str, ShapeRange]] | Mapping[str, ShapeRange] | None = None
    dla_core: int | None = None
    calibration: Path | None = None

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"unknown device {self.device!r}; expected one of {', '.join(DEVICES)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; expected one of {', '.join(PRECISIONS)}")
        if (self.precision == "int8") != (self.calibration is not None):
            raise ValueError("precision int8 needs a calibration folder of images, and only int8 takes one")
        for field in ("device_id", "intra_op_threads", "inter_op_threads", "workspace_bytes"):
            if getattr(self, field) < 0:
                raise ValueError(f"{field} must be >= 0, got {getattr(self, field)}")
        if self.dla_core is not None and self.dla_core < 0:
            raise ValueError(f"dla_core must be >= 0, got {self.dla_core}")
        if isinstance(self.profiles, Mapping):  # one profile
            object.__setattr__(self, "profiles", (dict(self.profiles),))
        elif self.profiles is not None:
            object.__setattr__(self, "profiles", tuple(dict(p) for p in self.profiles) or None)
        for profile in self.profiles or ():
            if set(profile) != set(self.profiles[0]):
                raise ValueError(
                    f"every profile must name the same inputs: {sorted(profile)} != {sorted(self.profiles[0])}"
                )
            for name, shapes in profile.items():
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
