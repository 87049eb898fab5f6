"""Runtime layer: one `Engine` interface over ONNX Runtime and native TensorRT.

Serving needs only numpy and onnxruntime; tensorrt and cuda-python are imported only when a
"tensorrt-native" engine is opened.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from inserve.engines.base import DEFAULT_OPTIONS, Engine, EngineOptions, EngineUnavailable
from inserve.engines.devices import available_devices
from inserve.engines.onnxruntime_engine import OrtEngine

__all__ = ["Engine", "EngineOptions", "EngineUnavailable", "available_devices", "open_engine"]


def open_engine(
    path: Path, options: EngineOptions = DEFAULT_OPTIONS, calibration: Sequence[np.ndarray] | None = None
) -> Engine:
    """Open the ONNX graph at `path` on the runtime `options.device` names.

    "tensorrt-native" builds (or loads from `options.cache_dir`) a TensorRT plan, calibrating an int8 build on
    `calibration` (batches of the graph's one input); every other device goes through ONNX Runtime, where
    "auto" takes the best installed provider and falls back to the CPU.
    """
    if options.device == "tensorrt-native":
        from inserve.engines.tensorrt_engine import TensorRTEngine

        return TensorRTEngine(path, options, calibration)
    return OrtEngine(path, options)
