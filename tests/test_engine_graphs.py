"""Tiny ONNX graphs with known weights for the engine tests, and their numpy references.

The graph is Conv(2 -> 3 channels, 3x3, pad 1) + Relu -> `feat`, and the spatial mean of `feat` ->
`pooled`: two outputs, dynamic batch/height/width. The numpy reference is checked here against
ONNX's own reference evaluator, so the engine tests compare against a verified oracle.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

IN_CHANNELS, OUT_CHANNELS = 2, 3


def conv_weights(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    weight = rng.normal(0.0, 0.5, size=(OUT_CHANNELS, IN_CHANNELS, 3, 3)).astype(np.float32)
    bias = rng.normal(0.0, 0.1, size=OUT_CHANNELS).astype(np.float32)
    return weight, bias


def conv_relu_model(weight: np.ndarray, bias: np.ndarray, *, static_shape: tuple[int, ...] | None = None) -> bytes:
    """Serialized Conv+Relu graph with outputs `feat` and `pooled`; dynamic N/H/W unless `static_shape`."""
    n, _, h, w = ("batch", IN_CHANNELS, "height", "width") if static_shape is None else static_shape
    nodes = [
        helper.make_node("Conv", ["image", "weight", "bias"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["feat"]),
        helper.make_node("ReduceMean", ["feat"], ["pooled"], axes=[2, 3], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "conv_relu",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [n, IN_CHANNELS, h, w])],
        [
            helper.make_tensor_value_info("feat", TensorProto.FLOAT, [n, OUT_CHANNELS, h, w]),
            helper.make_tensor_value_info("pooled", TensorProto.FLOAT, [n, OUT_CHANNELS]),
        ],
        initializer=[numpy_helper.from_array(weight, "weight"), numpy_helper.from_array(bias, "bias")],
    )
    # IR 8 is opset 17's: make_model would stamp the newest IR, which older runtimes and parsers reject
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def write_conv_relu(path: Path, seed: int = 0, *, static_shape: tuple[int, ...] | None = None) -> Path:
    path.write_bytes(conv_relu_model(*conv_weights(seed), static_shape=static_shape))
    return path


def conv_relu_reference(image: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> dict[str, np.ndarray]:
    """The graph by hand: zero-pad, sum over the 3x3 window and input channels, add bias, clamp at 0."""
    batch, _, height, width = image.shape
    padded = np.pad(image.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    conv = np.zeros((batch, OUT_CHANNELS, height, width))
    for dy in range(3):
        for dx in range(3):
            window = padded[:, :, dy : dy + height, dx : dx + width]
            conv += np.einsum("nchw,oc->nohw", window, weight[:, :, dy, dx].astype(np.float64))
    feat = np.maximum(conv + bias[None, :, None, None], 0.0)
    return {"feat": feat, "pooled": feat.mean(axis=(2, 3))}


def random_image(shape: tuple[int, ...], seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.0, 1.0, size=shape).astype(np.float32)


def test_reference_matches_onnx_reference_evaluator() -> None:
    weight, bias = conv_weights()
    image = random_image((2, IN_CHANNELS, 5, 7))
    feat, pooled = ReferenceEvaluator(conv_relu_model(weight, bias)).run(None, {"image": image})
    expected = conv_relu_reference(image, weight, bias)
    np.testing.assert_allclose(feat, expected["feat"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(pooled, expected["pooled"], rtol=1e-5, atol=1e-5)


def test_static_shape_variant_declares_fixed_dims() -> None:
    model = onnx.load_from_string(conv_relu_model(*conv_weights(), static_shape=(1, IN_CHANNELS, 8, 6)))
    assert model.ir_version == 8
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, IN_CHANNELS, 8, 6]
