"""Native TensorRT and the GPU execution providers.

The plan cache and the cuda-python error handling run everywhere; everything that needs a GPU is
marked `gpu` and skipped, with the reason, where tensorrt / onnxruntime-gpu / cuda-python or a GPU
is missing. GPU results are compared with the CPU engine: fp32 within 5e-3 (TensorRT and cuDNN use
TF32 for convolutions by default), fp16 within 3e-2.
"""

from __future__ import annotations

import enum
import importlib
import importlib.util
import os
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from test_engine_graphs import IN_CHANNELS, random_image, write_conv_relu

from inserve.engines import EngineOptions, open_engine, tensorrt_engine
from inserve.engines.cuda_runtime import CudaRuntime, load_cudart
from inserve.engines.devices import visible_gpus
from inserve.engines.onnxruntime_engine import CUDA_EP, TENSORRT_EP
from inserve.engines.plan_cache import plan_key, plan_path, read_plan, write_plan


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


HAS_GPU = visible_gpus() > 0
HAS_CUDA_PYTHON = _installed("cuda.bindings") or _installed("cuda.cudart")
NEEDS_GPU = pytest.mark.skipif(not HAS_GPU, reason="no NVIDIA GPU visible")
NEEDS_CUDA_PYTHON = pytest.mark.skipif(not HAS_CUDA_PYTHON, reason="cuda-python is not installed")
NEEDS_TENSORRT = pytest.mark.skipif(not _installed("tensorrt"), reason="tensorrt is not installed")
NEEDS_ORT_CUDA = pytest.mark.skipif(CUDA_EP not in ort.get_available_providers(), reason="no onnxruntime-gpu")
NEEDS_ORT_TENSORRT = pytest.mark.skipif(
    TENSORRT_EP not in ort.get_available_providers(), reason="no TensorRT EP in onnxruntime"
)

FP32 = {"rtol": 5e-3, "atol": 5e-3}
FP16 = {"rtol": 3e-2, "atol": 3e-2}
PROFILE = {"image": ((1, IN_CHANNELS, 2, 2), (2, IN_CHANNELS, 16, 16), (4, IN_CHANNELS, 32, 32))}
SHAPES = [(1, IN_CHANNELS, 2, 2), (2, IN_CHANNELS, 16, 16), (3, IN_CHANNELS, 9, 31), (4, IN_CHANNELS, 32, 32)]


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return write_conv_relu(tmp_path / "conv_relu.onnx")


def cpu_results(model: Path, image: np.ndarray) -> dict[str, np.ndarray]:
    return open_engine(model, EngineOptions(device="cpu")).run({"image": image})


def assert_parity(result: dict[str, np.ndarray], expected: dict[str, np.ndarray], tolerance: dict) -> None:
    assert set(result) == set(expected)
    for name, value in expected.items():
        assert result[name].dtype == value.dtype
        np.testing.assert_allclose(result[name], value, **tolerance)


# --- plan cache (no GPU needed) ---


def key(onnx: Path, **changes: object) -> str:
    settings = {"tensorrt_version": "10.9.0", "gpu_name": "NVIDIA H100", "precision": "fp32", "profiles": [PROFILE]}
    return plan_key(onnx, **(settings | changes))


def test_plan_key_is_stable_and_covers_every_build_input(tmp_path: Path) -> None:
    onnx = write_conv_relu(tmp_path / "a.onnx")
    base = key(onnx)
    assert base == key(onnx) and len(base) == 64
    changed = [
        key(write_conv_relu(tmp_path / "b.onnx", seed=1)),
        key(onnx, tensorrt_version="10.10.0"),
        key(onnx, gpu_name="Orin"),
        key(onnx, precision="fp16"),
        key(onnx, precision="int8", calibration="c0ffee"),
        key(onnx, profiles=[{"image": ((1, 2, 2, 2), (2, 2, 16, 16), (8, 2, 32, 32))}]),
        key(onnx, profiles=[PROFILE, {"image": ((1, 2, 2, 2), (2, 2, 16, 16), (8, 2, 32, 32))}]),
        key(onnx, profiles=None),
        key(onnx, dla_core=0),
    ]
    assert base not in changed and len(set(changed)) == len(changed)


def test_plan_key_follows_the_file_contents_not_its_name(tmp_path: Path) -> None:
    onnx = write_conv_relu(tmp_path / "model.onnx")
    before = key(onnx)
    assert key(write_conv_relu(tmp_path / "copy.onnx")) == before
    write_conv_relu(onnx, seed=1)
    assert key(onnx) != before


def test_plans_are_written_atomically_and_read_back(tmp_path: Path) -> None:
    path = plan_path(tmp_path / "cache", Path("models/backbone.onnx"), "ab" * 32)
    assert path == tmp_path / "cache" / f"backbone.{'ab' * 32}.plan"
    assert read_plan(path) is None
    write_plan(path, b"plan-1")
    write_plan(path, b"plan-2")
    assert read_plan(path) == b"plan-2"
    assert os.listdir(path.parent) == [path.name]


def test_a_failed_plan_write_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*_: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_plan(tmp_path / "x.plan", b"plan")
    assert os.listdir(tmp_path) == []


# --- cuda-python error convention ---


class FakeError(enum.Enum):
    cudaSuccess = 0
    cudaErrorMemoryAllocation = 2


def fake_malloc(nbytes: int) -> tuple[FakeError, int]:
    return (FakeError.cudaErrorMemoryAllocation, 0) if nbytes > 1024 else (FakeError.cudaSuccess, 4096)


FAKE_CUDART = types.SimpleNamespace(
    cudaError_t=FakeError,
    cudaMalloc=fake_malloc,
    cudaGetErrorName=lambda error: (FakeError.cudaSuccess, error.name.encode()),
    cudaGetErrorString=lambda error: (FakeError.cudaSuccess, b"out of memory"),
)


def test_cuda_status_tuples_become_values_or_exceptions() -> None:
    cuda = CudaRuntime(FAKE_CUDART)
    assert cuda.malloc(16) == 4096
    with pytest.raises(RuntimeError, match="CUDA error cudaErrorMemoryAllocation: out of memory"):
        cuda.malloc(1 << 20)


@NEEDS_CUDA_PYTHON
@pytest.mark.skipif(HAS_GPU, reason="checks the failure path of a machine without a GPU")
def test_real_cuda_python_without_a_gpu_raises() -> None:
    with pytest.raises(RuntimeError, match="CUDA error cudaError"):
        CudaRuntime(load_cudart()).malloc(16)


@pytest.mark.gpu
@NEEDS_CUDA_PYTHON
@NEEDS_GPU
def test_cuda_copies_round_trip_through_the_device() -> None:
    cuda = CudaRuntime(load_cudart())
    cuda.set_device(0)
    assert cuda.device_name(0)
    stream = cuda.create_stream()
    source = random_image((3, 5, 7))
    back = np.empty_like(source)
    pointer = cuda.malloc(source.nbytes)
    try:
        cuda.copy_to_device(pointer, source, stream)
        cuda.copy_to_host(back, pointer, stream)
        cuda.synchronize(stream)
    finally:
        cuda.free(pointer)
        cuda.destroy_stream(stream)
    np.testing.assert_array_equal(back, source)


# --- native TensorRT ---


@pytest.mark.gpu
@NEEDS_TENSORRT
@NEEDS_CUDA_PYTHON
@NEEDS_GPU
class TestNativeTensorRT:
    @staticmethod
    def options(tmp_path: Path, **changes: object) -> EngineOptions:
        settings = {"device": "tensorrt-native", "cache_dir": tmp_path / "plans", "profiles": PROFILE}
        return EngineOptions(**(settings | changes))

    @pytest.mark.parametrize("precision", ["fp32", "fp16"])
    def test_matches_the_cpu_engine(self, model: Path, tmp_path: Path, precision: str) -> None:
        engine = open_engine(model, self.options(tmp_path, precision=precision))
        assert engine.name.startswith("tensorrt:")
        assert engine.input_names == ("image",)
        assert engine.output_names == ("feat", "pooled")
        for seed, shape in enumerate(SHAPES):
            image = random_image(shape, seed=seed)
            tolerance = FP16 if precision == "fp16" else FP32
            assert_parity(engine.run({"image": image}), cpu_results(model, image), tolerance)
        pooled = engine.run({"image": image}, outputs=["pooled"])
        assert list(pooled) == ["pooled"]

    def test_concurrent_runs_match_sequential(self, model: Path, tmp_path: Path) -> None:
        engine = open_engine(model, self.options(tmp_path))
        images = [random_image(SHAPES[i % len(SHAPES)], seed=i) for i in range(16)]
        sequential = [engine.run({"image": image}) for image in images]
        with ThreadPoolExecutor(max_workers=4) as pool:
            concurrent = list(pool.map(lambda image: engine.run({"image": image}), images))
        for alone, together in zip(sequential, concurrent, strict=True):
            assert_parity(together, alone, {"rtol": 0, "atol": 0})

    def test_shapes_outside_the_profile_are_rejected(self, model: Path, tmp_path: Path) -> None:
        engine = open_engine(model, self.options(tmp_path))
        with pytest.raises(ValueError, match=r"outside every TensorRT profile \(image \[\(1, 2, 2, 2\), \(4, 2, 32"):
            engine.run({"image": random_image((5, IN_CHANNELS, 8, 8))})
        with pytest.raises(ValueError, match=r"dim 1 must be 2"):
            engine.run({"image": random_image((1, 3, 8, 8))})

    def test_dynamic_inputs_need_a_profile(self, model: Path, tmp_path: Path) -> None:
        with pytest.raises(ValueError, match=r"inputs \['image'\] have dynamic dims.*EngineOptions.profiles"):
            open_engine(model, self.options(tmp_path, profiles=None))

    def test_static_graph_needs_no_profile_or_cache(self, tmp_path: Path) -> None:
        static = write_conv_relu(tmp_path / "static.onnx", static_shape=(1, IN_CHANNELS, 8, 6))
        engine = open_engine(static, self.options(tmp_path, profiles=None, cache_dir=None))
        assert engine.plan_path is None and not engine.plan_from_cache
        image = random_image((1, IN_CHANNELS, 8, 6))
        assert_parity(engine.run({"image": image}), cpu_results(static, image), FP32)

    def test_plan_is_built_once_then_loaded_from_the_cache(self, model: Path, tmp_path: Path) -> None:
        first = open_engine(model, self.options(tmp_path))
        assert not first.plan_from_cache and first.plan_path.is_file()
        written = first.plan_path.stat().st_mtime_ns
        second = open_engine(model, self.options(tmp_path))
        assert second.plan_from_cache and second.plan_path == first.plan_path
        assert second.plan_path.stat().st_mtime_ns == written
        assert os.listdir(tmp_path / "plans") == [first.plan_path.name]
        image = random_image((2, IN_CHANNELS, 5, 5))
        assert_parity(second.run({"image": image}), first.run({"image": image}), {"rtol": 0, "atol": 0})

    def test_a_changed_graph_gets_a_new_plan(self, model: Path, tmp_path: Path) -> None:
        old = open_engine(model, self.options(tmp_path))
        write_conv_relu(model, seed=1)
        new = open_engine(model, self.options(tmp_path))
        assert not new.plan_from_cache and new.plan_path != old.plan_path
        assert sorted(os.listdir(tmp_path / "plans")) == sorted([old.plan_path.name, new.plan_path.name])
        image = random_image((2, IN_CHANNELS, 6, 6))
        assert_parity(new.run({"image": image}), cpu_results(model, image), FP32)

    def test_each_run_takes_the_profile_that_holds_its_shapes(self, model: Path, tmp_path: Path) -> None:
        small = {"image": ((1, IN_CHANNELS, 2, 2), (2, IN_CHANNELS, 8, 8), (4, IN_CHANNELS, 8, 8))}
        large = {"image": ((1, IN_CHANNELS, 16, 16), (2, IN_CHANNELS, 32, 32), (4, IN_CHANNELS, 32, 32))}
        engine = open_engine(model, self.options(tmp_path, profiles=[small, large]))
        for seed, shape in enumerate([(2, IN_CHANNELS, 8, 8), (3, IN_CHANNELS, 32, 24), (1, IN_CHANNELS, 4, 4)]):
            image = random_image(shape, seed=seed)
            assert_parity(engine.run({"image": image}), cpu_results(model, image), FP32)
        with pytest.raises(ValueError, match=r"outside every TensorRT profile"):
            engine.run({"image": random_image((1, IN_CHANNELS, 12, 12))})  # between the two

    def test_the_timing_cache_is_kept_beside_the_plans(self, model: Path, tmp_path: Path) -> None:
        open_engine(model, self.options(tmp_path))
        assert (tmp_path / "plans" / "timing.cache").stat().st_size > 0

    def test_a_strongly_typed_fp16_build_matches_within_fp16(
        self, model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The path of TensorRT releases without the FP16 flag: the graph's fp16 copy, strongly typed."""
        monkeypatch.setattr(tensorrt_engine, "strongly_typed", lambda trt, precision: precision == "fp16")
        engine = open_engine(model, self.options(tmp_path, precision="fp16"))
        assert list((tmp_path / "plans").glob("conv_relu.fp16.*.onnx"))
        image = random_image((2, IN_CHANNELS, 16, 16))
        assert_parity(engine.run({"image": image}), cpu_results(model, image), FP16)

    def test_int8_calibrates_on_the_batches_given(self, model: Path, tmp_path: Path) -> None:
        if not hasattr(importlib.import_module("tensorrt").BuilderFlag, "INT8"):
            pytest.skip("this TensorRT has no INT8 builder flag (implicit quantization)")
        folder = tmp_path / "images"  # named in the options (its digest keys the plan); batches come ready-made
        folder.mkdir()
        (folder / "one.png").write_bytes(b"\x89PNG")
        batches = [random_image((2, IN_CHANNELS, 16, 16), seed=s) for s in range(4)]
        engine = open_engine(model, self.options(tmp_path, precision="int8", calibration=folder), batches)
        image = random_image((2, IN_CHANNELS, 16, 16), seed=9)
        assert_parity(engine.run({"image": image}), cpu_results(model, image), {"rtol": 0.1, "atol": 0.1})
        assert list((tmp_path / "plans").glob("*.calibration"))

    def test_closed_engine_refuses_to_run(self, model: Path, tmp_path: Path) -> None:
        engine = open_engine(model, self.options(tmp_path))
        engine.close()
        with pytest.raises(RuntimeError, match="closed"):
            engine.run({"image": random_image((1, IN_CHANNELS, 4, 4))})


# --- ONNX Runtime's GPU providers ---


@pytest.mark.gpu
@NEEDS_GPU
class TestOrtGpuProviders:
    @NEEDS_ORT_CUDA
    def test_cuda_ep_matches_the_cpu(self, model: Path) -> None:
        engine = open_engine(model, EngineOptions(device="cuda"))
        assert engine.name == f"onnxruntime:{CUDA_EP}"
        image = random_image((3, IN_CHANNELS, 9, 31))
        assert_parity(engine.run({"image": image}), cpu_results(model, image), FP32)

    @NEEDS_ORT_TENSORRT
    def test_tensorrt_ep_matches_the_cpu_and_caches_its_engine(self, model: Path, tmp_path: Path) -> None:
        options = EngineOptions(device="tensorrt", cache_dir=tmp_path / "ort-trt", profiles=PROFILE)
        engine = open_engine(model, options)
        assert engine.name == f"onnxruntime:{TENSORRT_EP}"
        image = random_image((3, IN_CHANNELS, 9, 31))
        assert_parity(engine.run({"image": image}), cpu_results(model, image), FP32)
        assert list((tmp_path / "ort-trt").glob("*.engine"))
