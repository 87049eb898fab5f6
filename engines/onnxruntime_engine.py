"""ONNX Runtime engine: the portable runtime, from a laptop CPU up to a GPU through the CUDA or TensorRT EP.

Provider names and option keys follow the ONNX Runtime execution-provider docs
(onnxruntime.ai/docs/execution-providers/TensorRT-ExecutionProvider.html and CUDA-ExecutionProvider.html).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

from inserve.engines.base import DEFAULT_OPTIONS, EngineOptions, EngineUnavailable
from inserve.engines.tensors import TensorSpec, check_inputs, check_outputs

if TYPE_CHECKING:
    import onnxruntime as ort

# the base install leaves onnxruntime out on Linux aarch64, where a Jetson has JetPack's onnxruntime-gpu (the same
# module, which pip's CPU build would replace); other aarch64 Linux machines take the `cpu` extra (pyproject.toml)
INSTALL_ONNXRUNTIME = "pip install 'inserve[cpu]', or on a Jetson its JetPack's onnxruntime-gpu wheel (README, GPUs)"

TENSORRT_EP = "TensorrtExecutionProvider"
CUDA_EP = "CUDAExecutionProvider"
CPU_EP = "CPUExecutionProvider"

# GPU providers to try per device, best first; the CPU EP always comes last so that nodes a GPU EP
# cannot take still run. The CUDA EP backs the TensorRT EP for the same reason (ORT docs' advice).
_GPU_PROVIDERS = {
    "auto": (TENSORRT_EP, CUDA_EP),
    "cpu": (),
    "cuda": (CUDA_EP,),
    "tensorrt": (TENSORRT_EP, CUDA_EP),
}

# ONNX element types as ONNX Runtime spells them in NodeArg.type, for the ones numpy can hold.
_NUMPY_TYPES = {
    "float": np.float32,
    "float16": np.float16,
    "double": np.float64,
    "int8": np.int8,
    "int16": np.int16,
    "int32": np.int32,
    "int64": np.int64,
    "uint8": np.uint8,
    "uint16": np.uint16,
    "uint32": np.uint32,
    "uint64": np.uint64,
    "bool": np.bool_,
}

ProviderChoice = list[tuple[str, dict[str, object]]]


def load_onnxruntime() -> ModuleType:
    """onnxruntime, imported where an engine or the providers are first asked for, so that an install without it
    stops with EngineUnavailable saying what to install instead of an ImportError when inserve is imported."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise EngineUnavailable(f"onnxruntime cannot be imported ({exc}): {INSTALL_ONNXRUNTIME}") from exc
    return onnxruntime


def choose_providers(options: EngineOptions, available: Sequence[str]) -> ProviderChoice:
    """The (provider, provider options) list for InferenceSession, best first.

    "auto" takes whatever GPU providers are installed and always ends in the CPU EP; "cuda" and
    "tensorrt" insist on their provider, because a silent CPU fallback would hide a broken install.
    """
    if options.device == "tensorrt-native":
        raise ValueError("device 'tensorrt-native' runs on TensorRTEngine, not OrtEngine; use open_engine")
    wanted = _GPU_PROVIDERS[options.device]
    if options.device != "auto" and wanted and wanted[0] not in available:
        raise EngineUnavailable(
            f"device {options.device!r} needs onnxruntime-gpu with {wanted[0]} (pip install 'inserve[gpu]'); "
            f"installed providers: {list(available)}"
        )
    chosen = [name for name in wanted if name in available] + [CPU_EP]
    return [(name, _provider_options(name, options)) for name in chosen]


def _provider_options(provider: str, options: EngineOptions) -> dict[str, object]:
    if provider == CUDA_EP:
        return {"device_id": options.device_id}
    if provider != TENSORRT_EP:
        return {}
    if options.precision == "int8":
        raise EngineUnavailable(
            "int8 through onnxruntime's TensorRT EP needs a calibration table made beforehand; use --device "
            "tensorrt-native, which calibrates on the --calibration images itself"
        )
    trt: dict[str, object] = {
        "device_id": options.device_id,
        "trt_max_workspace_size": options.workspace_bytes,
        "trt_fp16_enable": options.precision == "fp16",
    }
    if options.cache_dir is not None:  # engines and the builder's timing cache, so a restart rebuilds nothing
        cache = str(options.cache_dir)
        trt |= {"trt_engine_cache_enable": True, "trt_engine_cache_path": cache}
        trt |= {"trt_timing_cache_enable": True, "trt_timing_cache_path": cache}
    if options.dla_core is not None:
        trt |= {"trt_dla_enable": True, "trt_dla_core": options.dla_core}
    if options.profiles:  # several profiles: each input named once per profile, in profile order
        for index, bound in enumerate(("min", "opt", "max")):
            trt[f"trt_profile_{bound}_shapes"] = ",".join(
                f"{name}:{'x'.join(map(str, shapes[index]))}"
                for profile in options.profiles
                for name, shapes in profile.items()
            )
    return trt


class OrtEngine:
    """An `Engine` over one onnxruntime.InferenceSession (whose `run` is itself thread-safe)."""

    def __init__(self, path: Path | str, options: EngineOptions = DEFAULT_OPTIONS) -> None:
        ort = load_onnxruntime()
        providers = choose_providers(options, ort.get_available_providers())
        if options.cache_dir is not None and providers[0][0] == TENSORRT_EP:
            Path(options.cache_dir).mkdir(parents=True, exist_ok=True)
        session_options = ort.SessionOptions()
        session_options.intra_op_num_threads = options.intra_op_threads
        session_options.enable_cpu_mem_arena = options.cpu_arena
        if options.inter_op_threads:  # onnxruntime ignores inter-op threads in sequential mode
            session_options.execution_mode = ort.ExecutionMode.ORT_PARALLEL
            session_options.inter_op_num_threads = options.inter_op_threads
        session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._session = ort.InferenceSession(str(path), sess_options=session_options, providers=providers)
        used = self._session.get_providers()[0]
        if options.device in ("cuda", "tensorrt") and used != providers[0][0]:
            raise EngineUnavailable(
                f"device {options.device!r}: onnxruntime could not start {providers[0][0]} and fell back "
                f"to {used}; no NVIDIA GPU visible, or its CUDA/cuDNN/TensorRT libraries are missing"
            )
        self.name = f"onnxruntime:{used}"
        self._inputs = tuple(
            TensorSpec(arg.name, _numpy_dtype(arg.type), _dims(arg.shape)) for arg in self._session.get_inputs()
        )
        self.input_names = tuple(spec.name for spec in self._inputs)
        self.output_names = tuple(arg.name for arg in self._session.get_outputs())

    @property
    def session_options(self) -> ort.SessionOptions:
        """The options the session actually runs with (threads, optimisation level), for stats and tests."""
        return self._session.get_session_options()

    def run(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Run the graph; `outputs=None` returns every output, otherwise only the named ones."""
        names = check_outputs(self.output_names, outputs)
        feed = check_inputs(self._inputs, inputs)
        if not names:  # onnxruntime reads an empty output list as "all outputs"
            return {}
        return dict(zip(names, self._session.run(list(names), feed), strict=True))


def _numpy_dtype(onnx_type: str) -> np.dtype | None:
    element = onnx_type.removeprefix("tensor(").removesuffix(")")
    return np.dtype(_NUMPY_TYPES[element]) if element in _NUMPY_TYPES else None


def _dims(shape: Sequence[object]) -> tuple[int | None, ...]:
    """Fixed dims as ints; symbolic (str), unknown (None) or negative dims become None."""
    return tuple(d if isinstance(d, int) and d >= 0 else None for d in shape)
