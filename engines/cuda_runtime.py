"""The few CUDA runtime calls the native TensorRT engine needs, through cuda-python.

cuda-python returns every call's status as the first item of a tuple instead of raising; this module
turns a failed status into an exception once, so the engine code reads as plain calls. The runtime
module is `cuda.bindings.runtime` since cuda-python 12.6 and `cuda.cudart` before; both have the
same functions.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from inserve.engines.base import EngineUnavailable

MISSING_GPU_PACKAGES = "tensorrt-native needs the tensorrt and cuda-python packages (pip install 'inserve[gpu]')"


def load_cudart() -> ModuleType:
    """cuda-python's runtime module, whichever name the installed version uses."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime
        except ImportError as exc:
            raise EngineUnavailable(MISSING_GPU_PACKAGES) from exc
    return runtime


class CudaRuntime:
    """Checked wrappers over cuda-python's runtime API; device pointers are plain ints."""

    def __init__(self, cudart: ModuleType) -> None:
        self._rt = cudart

    def _check(self, result: tuple[Any, ...]) -> Any:
        status, *values = result
        if status != self._rt.cudaError_t.cudaSuccess:
            _, name = self._rt.cudaGetErrorName(status)
            _, text = self._rt.cudaGetErrorString(status)
            raise RuntimeError(f"CUDA error {_text(name)}: {_text(text)}")
        return values[0] if len(values) == 1 else None

    def set_device(self, device_id: int) -> None:
        """Make `device_id` current for the calling thread (CUDA keeps one current device per thread)."""
        self._check(self._rt.cudaSetDevice(device_id))

    def device_name(self, device_id: int) -> str:
        return _text(self._check(self._rt.cudaGetDeviceProperties(device_id)).name)

    def malloc(self, nbytes: int) -> int:
        return int(self._check(self._rt.cudaMalloc(nbytes)))

    def free(self, pointer: int) -> None:
        self._check(self._rt.cudaFree(pointer))

    def create_stream(self) -> Any:
        return self._check(self._rt.cudaStreamCreate())

    def destroy_stream(self, stream: Any) -> None:
        self._check(self._rt.cudaStreamDestroy(stream))

    def synchronize(self, stream: Any) -> None:
        self._check(self._rt.cudaStreamSynchronize(stream))

    def copy_to_device(self, pointer: int, array: np.ndarray, stream: Any) -> None:
        """Queue a host-to-device copy of a C-contiguous array; keep `array` alive until `synchronize`."""
        kind = self._rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._check(self._rt.cudaMemcpyAsync(pointer, array.ctypes.data, array.nbytes, kind, stream))

    def copy_to_host(self, array: np.ndarray, pointer: int, stream: Any) -> None:
        """Queue a device-to-host copy into a C-contiguous array, valid after `synchronize`."""
        kind = self._rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._check(self._rt.cudaMemcpyAsync(array.ctypes.data, pointer, array.nbytes, kind, stream))


def _text(value: bytes | str) -> str:
    """cuda-python gives C strings as NUL-padded bytes in some versions and as str in others."""
    if isinstance(value, bytes):
        return value.split(b"\0", 1)[0].decode(errors="replace")
    return value
