"""What this machine can run: GPU visibility and the usable `EngineOptions.device` values."""

from __future__ import annotations

import ctypes
import importlib.util

from inserve.engines.onnxruntime_engine import CUDA_EP, TENSORRT_EP, load_onnxruntime

_DRIVER_LIBRARIES = ("libcuda.so.1", "libcuda.so", "nvcuda.dll")


def visible_gpus() -> int:
    """How many NVIDIA GPUs the driver reports (0 without a driver).

    Asks the CUDA driver library directly (cuInit + cuDeviceGetCount) so that the answer needs no
    CUDA Python package: onnxruntime-gpu lists its GPU providers even on machines without a GPU.
    """
    for name in _DRIVER_LIBRARIES:
        try:
            driver = ctypes.CDLL(name)
        except OSError:
            continue
        count = ctypes.c_int(0)
        if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0
        return count.value
    return 0


def available_devices() -> list[str]:
    """The `EngineOptions.device` values that can run here, fastest first; "cpu" is always there."""
    devices = []
    if visible_gpus() > 0:
        providers = load_onnxruntime().get_available_providers()
        if _importable("tensorrt") and (_importable("cuda.bindings") or _importable("cuda.cudart")):
            devices.append("tensorrt-native")
        if TENSORRT_EP in providers:
            devices.append("tensorrt")
        if CUDA_EP in providers:
            devices.append("cuda")
    return [*devices, "cpu"]


def builds_tensorrt(device: str) -> bool:
    """Whether graphs opened on `device` become TensorRT engines (which need optimisation profiles): the two
    TensorRT devices, and "auto" where onnxruntime has its TensorRT provider."""
    return device in ("tensorrt", "tensorrt-native") or (
        device == "auto" and TENSORRT_EP in load_onnxruntime().get_available_providers()
    )


def _importable(module: str) -> bool:
    """Whether `module` is installed, without importing it (tensorrt takes seconds to import)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a missing parent package ("cuda" for "cuda.bindings")
        return False
