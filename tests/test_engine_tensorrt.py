"""Native TensorRT and the GPU execution providers.

The plan cache, the cuda-python error handling, the int8 refusal and the plan import's refusals before a GPU
run everywhere; everything that needs a GPU is marked `gpu` and skipped, with the reason, where tensorrt /
onnxruntime-gpu / cuda-python or a GPU is missing. GPU results are compared with the CPU engine: on the test
graph fp32 within 5e-3 (TensorRT and cuDNN use TF32 for convolutions by default) and fp16 within 3e-2; on the
exported EfficientNet-Lite0 (tens of layers) the largest error relative to each output's largest magnitude, fp32
within 1e-2 and fp16 within 5e-2.
"""

from __future__ import annotations

import enum
import importlib
import importlib.util
import os
import re
import subprocess
import sys
import types
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from photos import photo
from PIL import Image
from test_engine_graphs import IN_CHANNELS, random_image, write_conv_relu

from inserve.engines import EngineOptions, EngineUnavailable, open_engine, tensorrt_engine
from inserve.engines.cuda_runtime import CudaRuntime, load_cudart
from inserve.engines.devices import visible_gpus
from inserve.engines.onnxruntime_engine import CUDA_EP, TENSORRT_EP
from inserve.engines.plan_cache import plan_key, plan_path, read_plan, write_plan
from inserve.engines.profiles import graph_profiles
from inserve.server.manifest import Manifest
from inserve.server.models import ModelBundle, ModelsError, ServingShapes, locate_manifest
from inserve.server.stages.dasr import batch_functionals


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
NETWORK_TOLERANCE = {"fp32": 1e-2, "fp16": 5e-2}  # the real network: of each output's largest magnitude
SERVED = ServingShapes(buckets=("1:1",), long_side=128, max_batch=2, max_seeds=8)  # one 128x128 bucket: quick builds
BUILD_FLAGS = ("--buckets", "1:1", "--long-side", "128", "--max-batch", "2", "--queue-depth", "4")  # the same, as flags
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


# --- int8 where TensorRT cannot calibrate (stand-ins for the module: only what the refusal looks at) ---


def tensorrt_module(*, int8_flag: bool = True, calibrator: bool = True) -> types.SimpleNamespace:
    """A TensorRT release as int8_refusal sees it: with or without the INT8 builder flag and the calibrator class."""
    module = types.SimpleNamespace(__version__="11.0.0", BuilderFlag=types.SimpleNamespace(FP16=1))
    if int8_flag:
        module.BuilderFlag.INT8 = 2
    if calibrator:
        module.IInt8EntropyCalibrator2 = object
    return module


@pytest.mark.parametrize(
    ("int8_flag", "calibrator", "lacking"),
    [
        (False, True, "has no INT8 builder flag:"),
        (True, False, "has no IInt8EntropyCalibrator2:"),
        (False, False, "has no INT8 builder flag and no IInt8EntropyCalibrator2:"),
    ],
)
def test_int8_is_refused_naming_the_version_and_what_it_lacks(int8_flag: bool, calibrator: bool, lacking: str) -> None:
    refusal = tensorrt_engine.int8_refusal(tensorrt_module(int8_flag=int8_flag, calibrator=calibrator))
    assert refusal is not None and f"TensorRT 11.0.0 {lacking}" in refusal and "--import-plan" in refusal


def test_a_tensorrt_with_the_flag_and_the_calibrator_can_calibrate() -> None:
    assert tensorrt_engine.int8_refusal(tensorrt_module()) is None


@pytest.fixture
def int8_options(tmp_path: Path) -> EngineOptions:
    folder = tmp_path / "images"  # only its digest is read: it keys the plan
    folder.mkdir()
    (folder / "one.png").write_bytes(b"\x89PNG")
    return EngineOptions(device="tensorrt-native", precision="int8", calibration=folder, cache_dir=tmp_path / "plans")


def never_called(table: Path | None) -> object:
    raise AssertionError("the calibrator was made although TensorRT cannot calibrate")


@pytest.mark.parametrize("cached", [True, False], ids=["cache-dir", "no-cache-dir"])
def test_int8_is_refused_before_any_calibrator_is_made(
    model: Path, int8_options: EngineOptions, cached: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    options = int8_options if cached else replace(int8_options, cache_dir=None)
    monkeypatch.setattr(tensorrt_engine, "build_plan", never_called)
    with pytest.raises(EngineUnavailable, match=r"TensorRT 11.0.0 has no IInt8EntropyCalibrator2"):
        tensorrt_engine._plan(tensorrt_module(calibrator=False), model, options, "Orin", never_called)


def test_build_plan_refuses_int8_before_touching_the_builder(model: Path, int8_options: EngineOptions) -> None:
    with pytest.raises(EngineUnavailable, match=r"TensorRT 11.0.0 has no INT8 builder flag"):
        tensorrt_engine.build_plan(tensorrt_module(int8_flag=False), model, int8_options, calibrator=object())


def test_a_cached_int8_plan_loads_where_tensorrt_cannot_calibrate(model: Path, int8_options: EngineOptions) -> None:
    """A plan imported from trtexec (a quantized graph) serves on a TensorRT without implicit quantization."""
    trt = tensorrt_module(int8_flag=False, calibrator=False)
    path = tensorrt_engine._cache_path(trt, model, int8_options, "Orin")
    write_plan(path, b"imported plan")
    assert tensorrt_engine._plan(trt, model, int8_options, "Orin", never_called) == (b"imported plan", path, True)


# --- plan import, as far as it goes without a GPU ---


def test_importing_a_plan_needs_a_cache_dir(model: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"importing a plan needs EngineOptions.cache_dir \(--engine-cache\)"):
        tensorrt_engine.import_plan(model, tmp_path / "any.plan", EngineOptions(device="tensorrt-native"), ["image"])


def test_importing_a_missing_plan_file_says_so_before_looking_for_a_gpu(model: Path, tmp_path: Path) -> None:
    options = EngineOptions(device="tensorrt-native", cache_dir=tmp_path / "plans")
    with pytest.raises(FileNotFoundError, match=r"missing.plan"):
        tensorrt_engine.import_plan(model, tmp_path / "missing.plan", options, ["image"])


def test_the_bundle_imports_a_plan_under_the_options_its_graph_builds_with(
    models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without opening any graph: build-engines imports first, so that an imported plan is loaded, not rebuilt."""
    calls = []
    monkeypatch.setattr(tensorrt_engine, "import_plan", lambda *args: calls.append(args) or tmp_path / "cached.plan")
    options = EngineOptions(device="tensorrt-native", cache_dir=tmp_path / "plans")
    bundle = ModelBundle.open(models_dir, "efficientnet_lite0", options, SERVED, open_backbone=False)
    assert bundle.import_plan("dasr_moments.onnx", tmp_path / "m.plan") == tmp_path / "cached.plan"
    entry = next(e for e in bundle.entries() if e.file == "dasr_moments.onnx")
    graph_options = bundle.graph_options(entry)
    assert graph_options.profiles == graph_profiles(entry.input_dims, bundle.shape_plan())
    assert calls == [(bundle.directory / "dasr_moments.onnx", tmp_path / "m.plan", graph_options, entry.inputs)]
    assert entry.inputs == ("image", "functionals")
    with pytest.raises(ModelsError, match=r"no graph 'nosuch.onnx' in .*; have \['backbone.onnx', 'cam_head.onnx'"):
        bundle.import_plan("nosuch.onnx", tmp_path / "m.plan")


def test_importing_a_plan_without_a_gpu_says_so(model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As on a machine with TensorRT and cuda-python but no GPU (the packages are stand-ins where not installed)."""
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.9.0"))
    monkeypatch.setattr(tensorrt_engine, "load_cudart", lambda: types.SimpleNamespace())
    monkeypatch.setattr(tensorrt_engine, "visible_gpus", lambda: 0)
    plan = tmp_path / "backbone.plan"
    plan.write_bytes(os.urandom(64))
    options = EngineOptions(device="tensorrt-native", cache_dir=tmp_path / "plans")
    with pytest.raises(EngineUnavailable, match=re.escape(tensorrt_engine.NO_GPU)):
        tensorrt_engine.import_plan(model, plan, options, ["image"])
    assert not (tmp_path / "plans").exists()


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


@pytest.mark.gpu
@NEEDS_TENSORRT
@NEEDS_CUDA_PYTHON
@NEEDS_GPU
class TestPlanImport:
    @staticmethod
    def built_plan(model: Path, tmp_path: Path, profile: dict = PROFILE) -> Path:
        """A plan saved to a file outside the cache, as `trtexec --saveEngine` leaves one."""
        options = EngineOptions(device="tensorrt-native", profiles=profile)
        plan = tmp_path / "built.plan"
        plan.write_bytes(tensorrt_engine.build_plan(importlib.import_module("tensorrt"), model, options))
        return plan

    def test_an_imported_plan_is_served_from_the_cache(self, model: Path, tmp_path: Path) -> None:
        plan = self.built_plan(model, tmp_path)
        options = TestNativeTensorRT.options(tmp_path)
        cached = tensorrt_engine.import_plan(model, plan, options, ["image"])
        assert cached.read_bytes() == plan.read_bytes()
        engine = open_engine(model, options)
        assert engine.plan_from_cache and engine.plan_path == cached
        for seed, shape in enumerate(SHAPES):
            image = random_image(shape, seed=seed)
            assert_parity(engine.run({"image": image}), cpu_results(model, image), FP32)

    def test_a_file_that_is_not_a_plan_is_refused(self, model: Path, tmp_path: Path) -> None:
        junk = tmp_path / "junk.plan"
        junk.write_bytes(np.random.default_rng(0).bytes(4096))
        message = r"junk.plan does not load: built by another TensorRT version or for another GPU \(this is TensorRT"
        with pytest.raises(ValueError, match=message):
            tensorrt_engine.import_plan(model, junk, TestNativeTensorRT.options(tmp_path), ["image"])
        assert not (tmp_path / "plans").exists()

    def test_a_plan_with_other_inputs_is_refused(self, model: Path, tmp_path: Path) -> None:
        plan = self.built_plan(model, tmp_path)
        with pytest.raises(ValueError, match=r"has the inputs \['image'\], not \['pixels'\]"):
            tensorrt_engine.import_plan(model, plan, TestNativeTensorRT.options(tmp_path), ["pixels"])
        assert not (tmp_path / "plans").exists()

    def test_a_plan_whose_profiles_miss_the_served_shapes_is_refused(self, model: Path, tmp_path: Path) -> None:
        narrow = {"image": ((1, IN_CHANNELS, 2, 2), (1, IN_CHANNELS, 8, 8), (1, IN_CHANNELS, 8, 8))}
        plan = self.built_plan(model, tmp_path, narrow)
        with pytest.raises(ValueError, match=r"no profile of the plan holds \{'image': \(\(1, 2, 2, 2\), \(2, 2, 16"):
            tensorrt_engine.import_plan(model, plan, TestNativeTensorRT.options(tmp_path), ["image"])
        assert not (tmp_path / "plans").exists()


# --- the exported EfficientNet-Lite0 on native TensorRT ---


def photo_batch() -> np.ndarray:
    """Two photos as the 128x128 bucket's network pixels (0..255), batched."""
    resized = [Image.fromarray(photo(name)).resize((128, 128)) for name in ("chelsea", "coffee")]
    return np.stack([np.asarray(image, np.float32).transpose(2, 0, 1) for image in resized])


def assert_close_at_scale(result: dict[str, np.ndarray], expected: dict[str, np.ndarray], tolerance: float) -> None:
    """Each output's largest error within `tolerance` of its largest magnitude: a deep network's errors grow with
    its activations, so elementwise tolerances would fail where the descriptors agree."""
    assert set(result) == set(expected)
    for name, value in expected.items():
        assert result[name].shape == value.shape, name
        error, scale = float(np.abs(result[name] - value).max()), float(np.abs(value).max())
        assert error <= tolerance * scale, f"{name}: max error {error:.3g} > {tolerance} x {scale:.3g}"


def inserve(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "inserve.clients.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=3600)


@pytest.mark.gpu
@NEEDS_TENSORRT
@NEEDS_CUDA_PYTHON
@NEEDS_GPU
class TestTheExportOnNativeTensorRT:
    @pytest.mark.parametrize("precision", ["fp32", "fp16"])
    def test_backbone_and_dasr_moments_match_onnxruntime_on_the_cpu(
        self, models_dir: Path, tmp_path: Path, precision: str
    ) -> None:
        """Profiles from the manifest and the buckets (graph_options), as the server opens the graphs."""
        manifest = locate_manifest(models_dir, "efficientnet_lite0")
        options = EngineOptions(device="tensorrt-native", precision=precision, cache_dir=tmp_path / "plans")
        gpu = ModelBundle(manifest, options, shapes=SERVED)
        cpu = ModelBundle(manifest, EngineOptions(device="cpu"), shapes=SERVED)
        assert gpu.backbone.name.startswith("tensorrt:") and cpu.backbone.name == "onnxruntime:CPUExecutionProvider"
        pixels = photo_batch()
        tolerance = NETWORK_TOLERANCE[precision]
        assert_close_at_scale(gpu.features(pixels), cpu.features(pixels), tolerance)
        stride = gpu.default_stop_stride
        functionals = batch_functionals(pixels, [(128, 128)] * len(pixels), stride)
        moments = gpu.features_and_moments(pixels, stride, functionals)
        assert_close_at_scale(moments, cpu.features_and_moments(pixels, stride, functionals), tolerance)
        with pytest.raises(ValueError, match=r"outside every TensorRT profile"):  # batch 3 > max_batch 2
            gpu.features(np.concatenate([pixels, pixels[:1]]))

    def test_build_engines_builds_a_plan_per_graph_then_reads_them_from_the_cache(
        self, models_dir: Path, tmp_path: Path
    ) -> None:
        cache = tmp_path / "engines"
        flags = ("--models", str(models_dir), "--device", "tensorrt-native", "--engine-cache", str(cache))
        build = ("--log-level", "INFO", "build-engines", *flags, *BUILD_FLAGS)
        graphs = [entry.file for entry in Manifest.load(locate_manifest(models_dir, "efficientnet_lite0")).entries()]
        first = inserve(*build)
        assert first.returncode == 0, first.stderr
        assert all(f"{graph}: ready" in first.stdout for graph in graphs)
        assert first.stderr.count("building TensorRT plan") == len(graphs)
        plans = {path.name: path.stat().st_mtime_ns for path in cache.glob("*.plan")}
        assert sorted(name.split(".")[0] for name in plans) == sorted(Path(graph).stem for graph in graphs)
        second = inserve(*build)
        assert second.returncode == 0, second.stderr
        assert "building TensorRT plan" not in second.stderr
        assert {path.name: path.stat().st_mtime_ns for path in cache.glob("*.plan")} == plans


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
