"""Device selection: provider order and options, option checks, and what a CPU-only machine reports."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import onnxruntime as ort
import pytest
from test_engine_graphs import write_conv_relu

from inserve.engines import EngineOptions, EngineUnavailable, available_devices, open_engine, tensorrt_engine
from inserve.engines import devices as devices_module
from inserve.engines.base import DEVICES
from inserve.engines.cuda_runtime import load_cudart
from inserve.engines.devices import builds_tensorrt, visible_gpus
from inserve.engines.onnxruntime_engine import (
    CPU_EP,
    CUDA_EP,
    INSTALL_ONNXRUNTIME,
    TENSORRT_EP,
    OrtEngine,
    choose_providers,
)

ALL_EPS = [TENSORRT_EP, CUDA_EP, CPU_EP]
INSTALLED = ort.get_available_providers()
HAS_GPU = visible_gpus() > 0


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_conv_relu(tmp_path_factory.mktemp("graphs") / "conv_relu.onnx")


def names(choice: list[tuple[str, dict[str, object]]]) -> list[str]:
    return [name for name, _ in choice]


@pytest.mark.parametrize(
    ("device", "available", "expected"),
    [
        ("auto", ALL_EPS, ALL_EPS),
        ("auto", [CUDA_EP, CPU_EP], [CUDA_EP, CPU_EP]),
        ("auto", ["AzureExecutionProvider", CPU_EP], [CPU_EP]),
        ("cpu", ALL_EPS, [CPU_EP]),
        ("cuda", ALL_EPS, [CUDA_EP, CPU_EP]),
        ("tensorrt", ALL_EPS, ALL_EPS),
        ("tensorrt", [TENSORRT_EP, CPU_EP], [TENSORRT_EP, CPU_EP]),
    ],
)
def test_provider_order(device: str, available: list[str], expected: list[str]) -> None:
    assert names(choose_providers(EngineOptions(device=device), available)) == expected


@pytest.mark.parametrize(("device", "provider"), [("cuda", CUDA_EP), ("tensorrt", TENSORRT_EP)])
def test_explicit_gpu_device_without_its_provider_is_unavailable(device: str, provider: str) -> None:
    message = rf"{device!r} needs onnxruntime-gpu with {provider}.*installed providers: \['CPUExecution"
    with pytest.raises(EngineUnavailable, match=message):
        choose_providers(EngineOptions(device=device), [CPU_EP])


def test_provider_options_follow_the_onnxruntime_names(tmp_path: Path) -> None:
    options = EngineOptions(
        device_id=1,
        precision="fp16",
        cache_dir=tmp_path,
        workspace_bytes=1 << 30,
        dla_core=1,
        profiles=[
            {"image": ((1, 2, 8, 8), (4, 2, 64, 64), (8, 2, 64, 64)), "seeds": ((1, 4), (16, 4), (64, 4))},
            {"image": ((1, 2, 96, 128), (4, 2, 96, 128), (8, 2, 96, 128)), "seeds": ((1, 4), (16, 4), (64, 4))},
        ],
    )
    trt, cuda, cpu = choose_providers(options, ALL_EPS)
    assert trt == (
        TENSORRT_EP,
        {
            "device_id": 1,
            "trt_max_workspace_size": 1 << 30,
            "trt_fp16_enable": True,
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(tmp_path),
            "trt_timing_cache_enable": True,
            "trt_timing_cache_path": str(tmp_path),
            "trt_dla_enable": True,
            "trt_dla_core": 1,
            # several profiles: each input once per profile, in profile order (the EP's ParseProfileShapes)
            "trt_profile_min_shapes": "image:1x2x8x8,seeds:1x4,image:1x2x96x128,seeds:1x4",
            "trt_profile_opt_shapes": "image:4x2x64x64,seeds:16x4,image:4x2x96x128,seeds:16x4",
            "trt_profile_max_shapes": "image:8x2x64x64,seeds:64x4,image:8x2x96x128,seeds:64x4",
        },
    )
    assert cuda == (CUDA_EP, {"device_id": 1})
    assert cpu == (CPU_EP, {})


def test_tensorrt_ep_without_cache_dir_does_not_cache() -> None:
    (_, trt), *_ = choose_providers(EngineOptions(), ALL_EPS)
    assert trt == {"device_id": 0, "trt_max_workspace_size": 2 << 30, "trt_fp16_enable": False}


def test_int8_through_the_tensorrt_ep_is_refused_with_the_way_that_works(tmp_path: Path) -> None:
    options = EngineOptions(device="tensorrt", precision="int8", calibration=tmp_path)
    with pytest.raises(EngineUnavailable, match=r"needs a calibration table.*use --device tensorrt-native"):
        choose_providers(options, ALL_EPS)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"device": "gpu"}, r"unknown device 'gpu'; expected one of auto, cpu, cuda, tensorrt, tensorrt-nat"),
        ({"intra_op_threads": -1}, r"intra_op_threads must be >= 0"),
        ({"profiles": {"image": ((1, 2), (2, 2))}}, r"'image' needs \(min, opt, max\)"),
        ({"profiles": {"image": ((1, 2), (2, 2), (4,))}}, r"'image': min \(1, 2\), .* differ in rank"),
        ({"profiles": {"image": ((4, 2), (2, 2), (8, 2))}}, r"'image': need 0 <= min <= opt <= max"),
        ({"profiles": [{"image": ((1,), (1,), (1,))}, {"x": ((1,), (1,), (1,))}]}, r"must name the same inputs"),
        ({"precision": "bf16"}, r"unknown precision 'bf16'; expected one of fp32, fp16, int8"),
        ({"precision": "int8"}, r"int8 needs a calibration folder"),
        ({"calibration": Path("images")}, r"only int8 takes one"),
        ({"dla_core": -1}, r"dla_core must be >= 0"),
    ],
)
def test_bad_options_are_rejected_early(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EngineOptions(**kwargs)


@pytest.mark.skipif(CUDA_EP in INSTALLED, reason="onnxruntime-gpu with the CUDA EP is installed here")
def test_cuda_on_a_cpu_only_install_names_the_missing_provider(model: Path) -> None:
    with pytest.raises(EngineUnavailable, match=r"'cuda' needs onnxruntime-gpu with CUDAExecutionProvider"):
        open_engine(model, EngineOptions(device="cuda"))


@pytest.mark.skipif(TENSORRT_EP in INSTALLED, reason="onnxruntime-gpu with the TensorRT EP is installed here")
def test_tensorrt_ep_on_a_cpu_only_install_names_the_missing_provider(model: Path) -> None:
    with pytest.raises(EngineUnavailable, match=r"'tensorrt' needs onnxruntime-gpu with TensorrtExecution"):
        open_engine(model, EngineOptions(device="tensorrt"))


@pytest.mark.skipif(HAS_GPU and bool({CUDA_EP, TENSORRT_EP} & set(INSTALLED)), reason="a GPU provider can run here")
def test_auto_falls_back_to_the_cpu(model: Path) -> None:
    engine = open_engine(model)
    assert isinstance(engine, OrtEngine)
    assert engine.name == "onnxruntime:CPUExecutionProvider"


def test_native_tensorrt_without_the_package_says_what_to_install(model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # as if not installed
    with pytest.raises(EngineUnavailable, match=r"needs the tensorrt and cuda-python packages.*inserve\[gpu"):
        open_engine(model, EngineOptions(device="tensorrt-native"))


def test_native_tensorrt_rejects_tensorrt_before_10(model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="8.6.1"))
    with pytest.raises(EngineUnavailable, match=r"needs TensorRT >= 10.*found 8.6.1"):
        open_engine(model, EngineOptions(device="tensorrt-native"))


def test_native_tensorrt_without_a_gpu_says_so(model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.9.0"))
    monkeypatch.setattr(tensorrt_engine, "load_cudart", lambda: types.SimpleNamespace())
    monkeypatch.setattr(tensorrt_engine, "visible_gpus", lambda: 0)
    with pytest.raises(EngineUnavailable, match=r"no NVIDIA GPU visible"):
        open_engine(model, EngineOptions(device="tensorrt-native"))


def test_missing_cuda_python_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    for module in ("cuda", "cuda.bindings", "cuda.cudart"):
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(EngineUnavailable, match=r"cuda-python.*inserve\[gpu\]"):
        load_cudart()


def test_without_onnxruntime_engines_say_what_to_install(model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Linux aarch64 installs leave onnxruntime out (a Jetson brings its own): opening an engine names the fix."""
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    message = r"onnxruntime cannot be imported \(.*\): " + re.escape(INSTALL_ONNXRUNTIME)
    with pytest.raises(EngineUnavailable, match=message):
        open_engine(model, EngineOptions(device="cpu"))
    with pytest.raises(EngineUnavailable, match=message):  # what "auto" asks before deriving TensorRT profiles
        builds_tensorrt("auto")
    assert builds_tensorrt("tensorrt-native")  # needs no onnxruntime


def test_available_devices_are_valid_and_end_in_cpu() -> None:
    found = available_devices()
    assert found[-1] == "cpu"
    assert set(found) <= set(DEVICES) - {"auto"}
    assert visible_gpus() >= 0


def test_without_a_gpu_only_the_cpu_is_available(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devices_module, "visible_gpus", lambda: 0)
    assert available_devices() == ["cpu"]
