"""Native TensorRT engine: builds a plan from an ONNX graph (or loads it from the plan cache) and runs it.

For GPUs where ONNX Runtime's TensorRT EP is not available (Jetson images ship TensorRT itself) or
where a plan built ahead of time should be reused as is. Written against the TensorRT 10 Python API
(docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/): Builder, IBuilderConfig and
IOptimizationProfile to build; the name-based IExecutionContext calls (set_input_shape,
set_tensor_address, execute_async_v3) to run. Device memory and the stream come from cuda-python.
"""

from __future__ import annotations

import functools
import logging
import threading
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from inserve.engines.base import DEFAULT_OPTIONS, EngineOptions, EngineUnavailable
from inserve.engines.cuda_runtime import MISSING_GPU_PACKAGES, CudaRuntime, load_cudart
from inserve.engines.devices import visible_gpus
from inserve.engines.plan_cache import plan_key, plan_path, read_plan, write_plan
from inserve.engines.tensors import TensorSpec, check_inputs, check_outputs

log = logging.getLogger(__name__)

_MIN_ALLOCATION = 256  # bytes; also gives empty tensors a real address


def _import_tensorrt() -> ModuleType:
    """Import tensorrt only when a native engine is asked for: it is large and GPU-only."""
    try:
        import tensorrt
    except ImportError as exc:
        raise EngineUnavailable(MISSING_GPU_PACKAGES) from exc
    if int(tensorrt.__version__.split(".")[0]) < 10:
        raise EngineUnavailable(
            f"tensorrt-native needs TensorRT >= 10 (name-based tensor API); found {tensorrt.__version__}"
        )
    return tensorrt


@functools.cache
def _logger(trt: ModuleType) -> Any:
    """One TensorRT logger per process, shared by builders and runtimes."""
    return trt.Logger(trt.Logger.WARNING)


def build_plan(trt: ModuleType, onnx_path: Path, options: EngineOptions) -> bytes:
    """Parse the ONNX graph and build a serialized plan with one optimization profile."""
    logger = _logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10 networks are always explicit-batch
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(parser.get_error(i).desc() for i in range(parser.num_errors))
        raise ValueError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_bytes)
    if options.fp16:
        fp16 = getattr(trt.BuilderFlag, "FP16", None)
        if fp16 is None:
            raise EngineUnavailable(
                f"TensorRT {trt.__version__} has no FP16 builder flag (removed in TensorRT 11); "
                "export the graph in fp16 instead"
            )
        config.set_flag(fp16)
    profile = _profile(builder, network, onnx_path, options)
    if profile is not None:
        config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT could not build a plan for {onnx_path}; see the TensorRT log above")
    return bytes(plan)


def _profile(builder: Any, network: Any, onnx_path: Path, options: EngineOptions) -> Any:
    """The optimization profile from `options.profiles`; required when any input has a dynamic dim."""
    inputs = {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}
    profiles = dict(options.profiles or {})
    unknown = sorted(set(profiles) - set(inputs))
    if unknown:
        raise ValueError(f"profiles name unknown inputs {unknown}; {onnx_path} has inputs {sorted(inputs)}")
    missing = [name for name, shape in inputs.items() if min(shape, default=0) < 0 and name not in profiles]
    if missing:
        raise ValueError(
            f"{onnx_path}: inputs {missing} have dynamic dims "
            f"({', '.join(f'{n}{inputs[n]}' for n in missing)}); "
            "TensorRT needs EngineOptions.profiles={name: (min_shape, opt_shape, max_shape)} for each"
        )
    if not profiles:
        return None
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in profiles.items():
        profile.set_shape(name, low, opt, high)
    return profile


class TensorRTEngine:
    """An `Engine` over a TensorRT plan; `run` serialises callers on one execution context and stream.

    `plan_path` is the plan's cache file (None without `cache_dir`) and `plan_from_cache` says whether
    this process loaded it rather than built it.
    """

    def __init__(self, onnx_path: Path | str, options: EngineOptions = DEFAULT_OPTIONS) -> None:
        trt = _import_tensorrt()
        cuda = CudaRuntime(load_cudart())
        gpus = visible_gpus()
        if gpus == 0:
            raise EngineUnavailable("tensorrt-native: no NVIDIA GPU visible (the CUDA driver reports none)")
        if options.device_id >= gpus:
            raise EngineUnavailable(f"tensorrt-native: device_id {options.device_id}, but {gpus} GPU(s) seen")
        cuda.set_device(options.device_id)
        gpu_name = cuda.device_name(options.device_id)
        onnx_path = Path(onnx_path)
        plan, self.plan_path, self.plan_from_cache = _plan(trt, onnx_path, options, gpu_name)
        self._runtime = trt.Runtime(_logger(trt))
        self._engine = self._runtime.deserialize_cuda_engine(plan)
        if self._engine is None:
            raise RuntimeError(
                f"TensorRT could not load the plan for {onnx_path}"
                + (f"; delete {self.plan_path} to rebuild it" if self.plan_from_cache else "")
            )
        self._context = self._engine.create_execution_context()
        self.name = f"tensorrt:{gpu_name}"
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        is_input = {name: self._engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT for name in names}
        self._dtypes = {name: _numpy_dtype(trt, name, self._engine.get_tensor_dtype(name)) for name in names}
        self._inputs = tuple(
            TensorSpec(name, self._dtypes[name], _dims(self._engine.get_tensor_shape(name)))
            for name in names
            if is_input[name]
        )
        self.input_names = tuple(spec.name for spec in self._inputs)
        self.output_names = tuple(name for name in names if not is_input[name])
        self._cuda = cuda
        self._device_id = options.device_id
        self._lock = threading.Lock()
        self._stream = cuda.create_stream()
        self._buffers: dict[str, tuple[int, int]] = {}  # tensor name -> (device pointer, capacity in bytes)
        self._release = weakref.finalize(self, _release, cuda, self._buffers, self._stream)

    def close(self) -> None:
        """Free the device buffers and the stream now instead of at garbage collection."""
        self._release()

    def run(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Run the graph; `outputs=None` returns every output, otherwise only the named ones."""
        names = check_outputs(self.output_names, outputs)
        feed = check_inputs(self._inputs, inputs)
        with self._lock:
            if not self._release.alive:
                raise RuntimeError(f"{self.name}: engine is closed")
            self._cuda.set_device(self._device_id)
            for name, array in feed.items():
                if not self._context.set_input_shape(name, array.shape):
                    low, _, high = self._engine.get_tensor_profile_shape(name, 0)
                    raise ValueError(
                        f"input {name!r} has shape {array.shape}, outside the TensorRT profile "
                        f"[{tuple(low)}, {tuple(high)}]; rebuild with wider EngineOptions.profiles"
                    )
            results = {name: self._output(name) for name in self.output_names}
            for name, array in feed.items():
                self._cuda.copy_to_device(self._bind(name, array.nbytes), array, self._stream)
            if not self._context.execute_async_v3(int(self._stream)):
                raise RuntimeError(f"{self.name}: execute_async_v3 failed; see the TensorRT log above")
            for name in names:
                self._cuda.copy_to_host(results[name], self._buffers[name][0], self._stream)
            self._cuda.synchronize(self._stream)
        return {name: results[name] for name in names}

    def _output(self, name: str) -> np.ndarray:
        """A host array for an output, shaped by the current input shapes, with a device buffer bound."""
        shape = tuple(self._context.get_tensor_shape(name))
        if min(shape, default=0) < 0:
            raise RuntimeError(f"output {name!r} has a data-dependent shape {shape}; not supported here")
        array = np.empty(shape, dtype=self._dtypes[name])
        self._bind(name, array.nbytes)
        return array

    def _bind(self, name: str, nbytes: int) -> int:
        """Point tensor `name` at a device buffer of at least `nbytes`, growing it when needed (lock held)."""
        buffer = self._buffers.get(name)
        if buffer is None or buffer[1] < nbytes:
            if buffer is not None:
                del self._buffers[name]
                self._cuda.free(buffer[0])
            capacity = max(nbytes, _MIN_ALLOCATION)
            buffer = self._buffers[name] = (self._cuda.malloc(capacity), capacity)
        self._context.set_tensor_address(name, buffer[0])
        return buffer[0]


def _plan(trt: ModuleType, onnx_path: Path, options: EngineOptions, gpu_name: str) -> tuple[bytes, Path | None, bool]:
    """(plan, its cache file or None, whether it came from the cache)."""
    if options.cache_dir is None:
        return build_plan(trt, onnx_path, options), None, False
    key = plan_key(
        onnx_path,
        tensorrt_version=trt.__version__,
        gpu_name=gpu_name,
        fp16=options.fp16,
        profiles=options.profiles,
    )
    path = plan_path(Path(options.cache_dir), onnx_path, key)
    cached = read_plan(path)
    if cached is not None:
        return cached, path, True
    log.info("building TensorRT plan for %s on %s (cached at %s)", onnx_path, gpu_name, path)
    plan = build_plan(trt, onnx_path, options)
    write_plan(path, plan)
    return plan, path, False


def _dims(shape: Any) -> tuple[int | None, ...]:
    """TensorRT marks dynamic dims with -1; TensorSpec uses None."""
    return tuple(d if d >= 0 else None for d in shape)


def _numpy_dtype(trt: ModuleType, name: str, dtype: Any) -> np.dtype:
    try:
        return np.dtype(trt.nptype(dtype))
    except TypeError as exc:
        raise ValueError(f"tensor {name!r} has TensorRT type {dtype}, which numpy cannot hold") from exc


def _release(cuda: CudaRuntime, buffers: dict[str, tuple[int, int]], stream: Any) -> None:
    for pointer, _ in buffers.values():
        cuda.free(pointer)
    buffers.clear()
    cuda.destroy_stream(stream)
