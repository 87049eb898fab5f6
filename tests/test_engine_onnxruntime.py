"""OrtEngine on the CPU EP: numerics against numpy, dynamic shapes, output subsets, threads, bad feeds."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from test_engine_graphs import IN_CHANNELS, conv_relu_reference, conv_weights, random_image, write_conv_relu

from inserve.engines import Engine, EngineOptions
from inserve.engines.onnxruntime_engine import OrtEngine

# float32 conv over 18 products per output against a float64 reference
TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_conv_relu(tmp_path_factory.mktemp("graphs") / "conv_relu.onnx")


@pytest.fixture(scope="module")
def engine(model: Path) -> OrtEngine:
    return OrtEngine(model, EngineOptions(device="cpu"))


def test_describes_itself(engine: OrtEngine) -> None:
    assert isinstance(engine, Engine)
    assert engine.name == "onnxruntime:CPUExecutionProvider"
    assert engine.input_names == ("image",)
    assert engine.output_names == ("feat", "pooled")


@pytest.mark.parametrize("shape", [(1, IN_CHANNELS, 5, 7), (3, IN_CHANNELS, 8, 6), (2, IN_CHANNELS, 1, 1)])
def test_matches_numpy_for_dynamic_shapes(engine: OrtEngine, shape: tuple[int, ...]) -> None:
    image = random_image(shape)
    result = engine.run({"image": image})
    expected = conv_relu_reference(image, *conv_weights())
    assert set(result) == {"feat", "pooled"}
    assert result["feat"].shape == (shape[0], 3, shape[2], shape[3])
    assert result["pooled"].shape == (shape[0], 3)
    for name in ("feat", "pooled"):
        assert result[name].dtype == np.float32
        np.testing.assert_allclose(result[name], expected[name], **TOLERANCE)


def test_output_subset(engine: OrtEngine) -> None:
    image = random_image((2, IN_CHANNELS, 4, 4))
    result = engine.run({"image": image}, outputs=["pooled"])
    assert list(result) == ["pooled"]
    expected = conv_relu_reference(image, *conv_weights())["pooled"]
    np.testing.assert_allclose(result["pooled"], expected, **TOLERANCE)
    assert engine.run({"image": image}, outputs=[]) == {}


def test_unknown_output_is_named(engine: OrtEngine) -> None:
    with pytest.raises(ValueError, match=r"unknown output\(s\) \['logits'\].*'feat', 'pooled'"):
        engine.run({"image": random_image((1, IN_CHANNELS, 4, 4))}, outputs=["logits"])


def test_concurrent_runs_match_sequential(engine: OrtEngine) -> None:
    images = [random_image((1 + i % 3, IN_CHANNELS, 4 + i % 5, 6), seed=i) for i in range(16)]
    sequential = [engine.run({"image": image}) for image in images]
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(lambda image: engine.run({"image": image}), images))
    for alone, together in zip(sequential, concurrent, strict=True):
        for name in ("feat", "pooled"):
            np.testing.assert_array_equal(together[name], alone[name])


GOOD = random_image((1, IN_CHANNELS, 4, 4))


@pytest.mark.parametrize(
    ("feed", "message"),
    [
        ({"img": GOOD}, r"unknown input 'img', missing input 'image'; .* image: float32\[\?, 2, \?, \?\]"),
        ({}, r"missing input 'image'"),
        ({"image": GOOD[0]}, r"'image' has shape \(2, 4, 4\) \(rank 3\); the graph expects rank 4"),
        ({"image": GOOD.astype(np.float64)}, r"'image' has dtype float64; the graph expects image: float32"),
        ({"image": random_image((1, 3, 4, 4))}, r"'image' has shape \(1, 3, 4, 4\); dim 1 must be 2"),
    ],
    ids=["unknown-name", "missing", "rank", "dtype", "fixed-dim"],
)
def test_bad_inputs_say_what_is_wrong(engine: OrtEngine, feed: dict[str, np.ndarray], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        engine.run(feed)


def test_thread_and_optimisation_options_reach_the_session(model: Path) -> None:
    engine = OrtEngine(model, EngineOptions(device="cpu", intra_op_threads=1, inter_op_threads=2))
    options = engine.session_options
    assert options.intra_op_num_threads == 1
    assert options.inter_op_num_threads == 2
    assert options.execution_mode == ort.ExecutionMode.ORT_PARALLEL
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert OrtEngine(model, EngineOptions(device="cpu")).session_options.execution_mode == (
        ort.ExecutionMode.ORT_SEQUENTIAL
    )
    assert (
        options.enable_cpu_mem_arena
        and OrtEngine(model, EngineOptions(device="cpu")).session_options.enable_cpu_mem_arena
    )
    lean = OrtEngine(model, EngineOptions(device="cpu", cpu_arena=False))
    assert not lean.session_options.enable_cpu_mem_arena
    image = random_image((1, IN_CHANNELS, 3, 3))
    for runs in (engine, lean):
        np.testing.assert_allclose(
            runs.run({"image": image})["feat"], conv_relu_reference(image, *conv_weights())["feat"], **TOLERANCE
        )
