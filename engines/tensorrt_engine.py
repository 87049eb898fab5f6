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
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from inserve.engines.base import DEFAULT_OPTIONS, EngineOptions, EngineUnavailable
from inserve.engines.cuda_runtime import MISSING_GPU_PACKAGES, CudaRuntime, load_cudart
from inserve.engines.devices import visible_gpus
from inserve.engines.plan_cache import plan_key, plan_path, read_plan, write_plan
from inserve.engines.precision import calibration_digest, fp16_graph
from inserve.engines.profiles import Profile, covering_profile
from inserve.engines.tensors import TensorSpec, check_inputs, check_outputs

log = logging.getLogger(__name__)

_MIN_ALLOCATION = 256  # bytes; also gives empty tensors a real address
TIMING_CACHE = "timing.cache"  # in EngineOptions.cache_dir
NO_GPU = "tensorrt-native: no NVIDIA GPU visible (the CUDA driver reports none)"
IMPORT_NEEDS_CACHE = "importing a plan needs EngineOptions.cache_dir (--engine-cache)"


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


def _open_gpu(options: EngineOptions) -> tuple[ModuleType, CudaRuntime, str]:
    """TensorRT, the CUDA runtime with `options.device_id` current, and that GPU's name; EngineUnavailable naming
    what is missing (the packages, a GPU) otherwise. What building, loading and importing a plan all need."""
    trt = _import_tensorrt()
    cuda = CudaRuntime(load_cudart())
    gpus = visible_gpus()
    if gpus == 0:
        raise EngineUnavailable(NO_GPU)
    if options.device_id >= gpus:
        raise EngineUnavailable(f"tensorrt-native: device_id {options.device_id}, but {gpus} GPU(s) seen")
    cuda.set_device(options.device_id)
    return trt, cuda, cuda.device_name(options.device_id)


def int8_refusal(trt: ModuleType) -> str | None:
    """Why this TensorRT cannot build int8 by calibration (None: it can). Asked before any calibrator is made:
    making one subclasses trt.IInt8EntropyCalibrator2, which TensorRT releases without implicit quantization do
    not have."""
    lacking = [
        name
        for name, present in (
            ("INT8 builder flag", hasattr(trt.BuilderFlag, "INT8")),
            ("IInt8EntropyCalibrator2", hasattr(trt, "IInt8EntropyCalibrator2")),
        )
        if not present
    ]
    if not lacking:
        return None
    return (
        f"int8 by calibration needs TensorRT's implicit quantization; TensorRT {trt.__version__} has no "
        f"{' and no '.join(lacking)}: quantize the graph (Q/DQ) and import the plan trtexec builds from it "
        "(build-engines --import-plan), or use --precision fp16"
    )


def _refuse_int8(trt: ModuleType, options: EngineOptions) -> None:
    """EngineUnavailable where `options` ask for int8 and this TensorRT cannot calibrate (int8_refusal)."""
    refusal = int8_refusal(trt) if options.precision == "int8" else None
    if refusal is not None:
        raise EngineUnavailable(refusal)


def strongly_typed(trt: ModuleType, precision: str) -> bool:
    """Whether this build takes its precision from the graph: fp16 where the installed TensorRT has no FP16
    builder flag (removed after TensorRT 10); fp32 needs no flag either way."""
    return precision == "fp16" and not hasattr(trt.BuilderFlag, "FP16")


def build_plan(
    trt: ModuleType, onnx_path: Path, options: EngineOptions, calibrator: Any = None, work_dir: Path | None = None
) -> bytes:
    """Parse the ONNX graph and build a serialized plan with one optimisation profile per `options.profiles`.

    fp16 sets the FP16 flag on a weakly typed network (TensorRT 10) or, without that flag, builds a strongly
    typed network from the graph's fp16 copy (engines/precision.py, written to `work_dir`); int8 needs the INT8
    flag (implicit quantization) and `calibrator`, and keeps fp16 for the layers int8 cannot run.
    """
    _refuse_int8(trt, options)
    if options.precision == "int8" and calibrator is None:
        raise EngineUnavailable("int8 needs calibration batches of the graph's input; got none")
    typed = strongly_typed(trt, options.precision)
    source = fp16_graph(onnx_path, work_dir or onnx_path.parent) if typed else onnx_path
    logger = _logger(trt)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if typed else 0
    network = builder.create_network(flags)  # TensorRT 10 networks are always explicit-batch
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(source)):
        errors = "; ".join(parser.get_error(i).desc() for i in range(parser.num_errors))
        raise ValueError(f"TensorRT cannot parse {source}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_bytes)
    if options.precision in ("fp16", "int8") and not typed:
        config.set_flag(trt.BuilderFlag.FP16)
    if options.precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
        config.int8_calibrator = calibrator
    if options.dla_core is not None:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = options.dla_core
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)  # layers the DLA cannot run stay on the GPU
    profiles = _profiles(builder, network, onnx_path, options)
    for profile in profiles:
        config.add_optimization_profile(profile)
    if options.precision == "int8" and profiles:
        config.set_calibration_profile(profiles[0])
    timing = _timing_cache_path(options)
    if timing is not None:
        config.set_timing_cache(config.create_timing_cache(read_plan(timing) or b""), ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT could not build a plan for {onnx_path}; see the TensorRT log above")
    if timing is not None:
        write_plan(timing, bytes(config.get_timing_cache().serialize()))
    return bytes(plan)


def _timing_cache_path(options: EngineOptions) -> Path | None:
    """The builder's timing cache, shared by every graph built in `cache_dir`: layer timings measured once."""
    return None if options.cache_dir is None else Path(options.cache_dir) / TIMING_CACHE


def _profiles(builder: Any, network: Any, onnx_path: Path, options: EngineOptions) -> list[Any]:
    """The optimisation profiles from `options.profiles`; required when any input has a dynamic dim."""
    inputs = {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}
    profiles = list(options.profiles or ())
    named = set(profiles[0]) if profiles else set()
    unknown = sorted(named - set(inputs))
    if unknown:
        raise ValueError(f"profiles name unknown inputs {unknown}; {onnx_path} has inputs {sorted(inputs)}")
    missing = [name for name, shape in inputs.items() if min(shape, default=0) < 0 and name not in named]
    if missing:
        raise ValueError(
            f"{onnx_path}: inputs {missing} have dynamic dims "
            f"({', '.join(f'{n}{inputs[n]}' for n in missing)}); "
            "TensorRT needs EngineOptions.profiles=[{name: (min_shape, opt_shape, max_shape)}] for each"
        )
    built = []
    for shapes in profiles:
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in shapes.items():
            profile.set_shape(name, low, opt, high)
        built.append(profile)
    return built


def entropy_calibrator(trt: ModuleType, cuda: CudaRuntime, batches: Sequence[np.ndarray], cache: Path | None) -> Any:
    """TensorRT's entropy calibrator (IInt8EntropyCalibrator2) over `batches` of the graph's one input, on the
    device in turn; its table is kept at `cache` so a rebuild calibrates no more."""

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self._batches = iter(batches)
            self._pointer = cuda.malloc(max(b.nbytes for b in batches))
            self._stream = cuda.create_stream()

        def get_batch_size(self) -> int:
            return int(batches[0].shape[0])

        def get_batch(self, names: list[str]) -> list[int] | None:
            batch = next(self._batches, None)
            if batch is None:
                return None
            cuda.copy_to_device(self._pointer, np.ascontiguousarray(batch, dtype=np.float32), self._stream)
            cuda.synchronize(self._stream)
            return [int(self._pointer)]

        def read_calibration_cache(self) -> bytes | None:
            return None if cache is None else read_plan(cache)

        def write_calibration_cache(self, table: Any) -> None:
            if cache is not None:
                write_plan(cache, bytes(table))

        def __del__(self) -> None:
            cuda.free(self._pointer)
            cuda.destroy_stream(self._stream)

    if not batches:
        raise ValueError("int8 calibration needs at least one full batch of images")
    return EntropyCalibrator()


class TensorRTEngine:
    """An `Engine` over a TensorRT plan; `run` serialises callers on one stream, with one execution context per
    optimisation profile (each run takes the first profile that holds its shapes).

    `plan_path` is the plan's cache file (None without `cache_dir`) and `plan_from_cache` says whether
    this process loaded it rather than built it. `calibration`: int8 calibration batches of the graph's one
    input (precision int8 only).
    """

    def __init__(
        self,
        onnx_path: Path | str,
        options: EngineOptions = DEFAULT_OPTIONS,
        calibration: Sequence[np.ndarray] | None = None,
    ) -> None:
        trt, cuda, gpu_name = _open_gpu(options)
        onnx_path = Path(onnx_path)

        def calibrator(cache: Path | None) -> Any:
            return None if calibration is None else entropy_calibrator(trt, cuda, calibration, cache)

        plan, self.plan_path, self.plan_from_cache = _plan(trt, onnx_path, options, gpu_name, calibrator)
        self._runtime = trt.Runtime(_logger(trt))
        self._engine = self._runtime.deserialize_cuda_engine(plan)
        if self._engine is None:
            raise RuntimeError(
                f"TensorRT could not load the plan for {onnx_path}"
                + (f"; delete {self.plan_path} to rebuild it" if self.plan_from_cache else "")
            )
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
        self._contexts = [
            self._engine.create_execution_context() for _ in range(self._engine.num_optimization_profiles)
        ]
        for index, context in enumerate(self._contexts[1:], start=1):
            context.set_optimization_profile_async(index, int(self._stream))
        self._profiles = _engine_profiles(self._engine, self.input_names)
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
            context = self._context_for({name: array.shape for name, array in feed.items()})
            for name, array in feed.items():
                if not context.set_input_shape(name, array.shape):
                    raise ValueError(f"input {name!r} has shape {array.shape}, which TensorRT refuses")
            results = {name: self._output(context, name) for name in self.output_names}
            for name, array in feed.items():
                self._cuda.copy_to_device(self._bind(context, name, array.nbytes), array, self._stream)
            if not context.execute_async_v3(int(self._stream)):
                raise RuntimeError(f"{self.name}: execute_async_v3 failed; see the TensorRT log above")
            for name in names:
                self._cuda.copy_to_host(results[name], self._buffers[name][0], self._stream)
            self._cuda.synchronize(self._stream)
        return {name: results[name] for name in names}

    def _context_for(self, shapes: Mapping[str, tuple[int, ...]]) -> Any:
        """The execution context of the first profile whose [min, max] holds every input's shape."""
        if len(self._contexts) == 1 and not any(None in spec.shape for spec in self._inputs):
            return self._contexts[0]  # a static graph: check_inputs has checked the shapes
        index = covering_profile(self._profiles, shapes)
        if index is None:
            ranges = "; ".join(
                ", ".join(f"{name} [{low}, {high}]" for name, (low, _, high) in profile.items())
                for profile in self._profiles
            )
            shown = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
            raise ValueError(
                f"inputs {shown} are outside every TensorRT profile ({ranges}); "
                "rebuild with wider EngineOptions.profiles"
            )
        return self._contexts[index]

    def _output(self, context: Any, name: str) -> np.ndarray:
        """A host array for an output, shaped by the current input shapes, with a device buffer bound."""
        shape = tuple(context.get_tensor_shape(name))
        if min(shape, default=0) < 0:
            raise RuntimeError(f"output {name!r} has a data-dependent shape {shape}; not supported here")
        array = np.empty(shape, dtype=self._dtypes[name])
        self._bind(context, name, array.nbytes)
        return array

    def _bind(self, context: Any, name: str, nbytes: int) -> int:
        """Point tensor `name` at a device buffer of at least `nbytes`, growing it when needed (lock held)."""
        buffer = self._buffers.get(name)
        if buffer is None or buffer[1] < nbytes:
            if buffer is not None:
                del self._buffers[name]
                self._cuda.free(buffer[0])
            capacity = max(nbytes, _MIN_ALLOCATION)
            buffer = self._buffers[name] = (self._cuda.malloc(capacity), capacity)
        context.set_tensor_address(name, buffer[0])
        return buffer[0]


def _engine_profiles(engine: Any, input_names: Sequence[str]) -> list[Profile]:
    """The (min, opt, max) shape of each input in each of a deserialized engine's optimisation profiles."""
    return [
        {name: tuple(tuple(s) for s in engine.get_tensor_profile_shape(name, index)) for name in input_names}
        for index in range(engine.num_optimization_profiles)
    ]


def _plan(
    trt: ModuleType, onnx_path: Path, options: EngineOptions, gpu_name: str, calibrator: Callable[[Path | None], Any]
) -> tuple[bytes, Path | None, bool]:
    """(plan, its cache file or None, whether it came from the cache). `calibrator(table path)` makes the int8
    calibrator, asked only when a plan is built and this TensorRT can calibrate: a cached int8 plan (imported from
    trtexec) still loads where it cannot."""
    path = None if options.cache_dir is None else _cache_path(trt, onnx_path, options, gpu_name)
    cached = None if path is None else read_plan(path)
    if cached is not None:
        return cached, path, True
    _refuse_int8(trt, options)
    log.info("building TensorRT plan for %s on %s (cached at %s)", onnx_path, gpu_name, path)
    table = None if path is None else path.with_suffix(".calibration")
    work_dir = None if options.cache_dir is None else Path(options.cache_dir)
    plan = build_plan(trt, onnx_path, options, calibrator(table), work_dir)
    if path is not None:
        write_plan(path, plan)
    return plan, path, False


def _cache_path(trt: ModuleType, onnx_path: Path, options: EngineOptions, gpu_name: str) -> Path:
    """Where the plan of `onnx_path` built with `options` on this TensorRT and GPU is cached."""
    key = plan_key(
        onnx_path,
        tensorrt_version=trt.__version__,
        gpu_name=gpu_name,
        precision=options.precision,
        profiles=options.profiles,
        dla_core=options.dla_core,
        calibration=None if options.calibration is None else calibration_digest(options.calibration),
    )
    return plan_path(Path(options.cache_dir), onnx_path, key)


def import_plan(onnx_path: Path, plan_file: Path, options: EngineOptions, inputs: Sequence[str]) -> Path:
    """Copy a plan built elsewhere (trtexec --onnx=GRAPH --saveEngine=PLAN, with the same precision and shapes)
    into `options.cache_dir` as the plan of `onnx_path`, whose inputs are named `inputs`, after checking that this
    TensorRT on this GPU loads it, that its inputs are the graph's and that its profiles hold `options.profiles`.
    Returns the cache file."""
    if options.cache_dir is None:
        raise ValueError(IMPORT_NEEDS_CACHE)
    plan = Path(plan_file).read_bytes()
    trt, _, gpu_name = _open_gpu(options)
    engine = trt.Runtime(_logger(trt)).deserialize_cuda_engine(plan)
    if engine is None:
        raise ValueError(
            f"{plan_file} does not load: built by another TensorRT version or for another GPU "
            f"(this is TensorRT {trt.__version__} on {gpu_name})"
        )
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    held = sorted(name for name in names if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT)
    if held != sorted(inputs):
        raise ValueError(f"{plan_file} has the inputs {held}, not {sorted(inputs)} of {onnx_path}")
    uncovered = _uncovered(_engine_profiles(engine, held), options.profiles or ())
    if uncovered:
        raise ValueError(
            f"{plan_file}: no profile of the plan holds {uncovered[0]} (min, opt, max), which the server feeds "
            f"{onnx_path}; build it with the shapes of `inserve build-engines` (README, GPUs)"
        )
    path = _cache_path(trt, onnx_path, options, gpu_name)
    write_plan(path, plan)
    return path


def _uncovered(held: Sequence[Profile], wanted: Sequence[Profile]) -> list[Profile]:
    """The `wanted` profiles that no profile of `held` holds from their min to their max shapes."""
    return [
        profile
        for profile in wanted
        if not any(
            covering_profile([built], {name: shapes[0] for name, shapes in profile.items()}) == 0
            and covering_profile([built], {name: shapes[2] for name, shapes in profile.items()}) == 0
            for built in held
        )
    ]


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
