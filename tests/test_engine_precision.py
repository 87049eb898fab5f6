"""fp16 graphs for strongly typed TensorRT networks, checked on the CPU (ONNX Runtime runs fp16 graphs too), and
the int8 calibration images as the server prepares them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from photos import encode, photo
from PIL import Image
from test_engine_graphs import IN_CHANNELS, random_image, write_conv_relu

from inserve.engines import EngineOptions, open_engine
from inserve.engines.precision import calibration_batches, calibration_digest, fp16_graph
from inserve.server.models import ModelBundle, ServingShapes, locate_manifest


def cpu(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return open_engine(path, EngineOptions(device="cpu")).run(feeds)


def test_the_fp16_graph_keeps_fp32_inputs_and_outputs_and_matches_within_fp16(tmp_path: Path) -> None:
    model = write_conv_relu(tmp_path / "conv_relu.onnx")
    half = fp16_graph(model, tmp_path / "cache")
    image = random_image((2, IN_CHANNELS, 16, 12))
    full, reduced = cpu(model, {"image": image}), cpu(half, {"image": image})
    for name, value in full.items():
        assert reduced[name].dtype == np.float32
        np.testing.assert_allclose(reduced[name], value, rtol=1e-2, atol=1e-2)
    weights = onnx.load(str(half)).graph.initializer
    assert weights and {w.data_type for w in weights} == {onnx.TensorProto.FLOAT16}
    mtime = half.stat().st_mtime_ns
    assert fp16_graph(model, tmp_path / "cache") == half and half.stat().st_mtime_ns == mtime  # made once
    write_conv_relu(model, seed=1)
    assert fp16_graph(model, tmp_path / "cache") != half  # a changed graph gets its own copy


def test_the_fp16_backbone_gives_the_same_descriptors(models_dir: Path, tmp_path: Path) -> None:
    """The real EfficientNet-Lite0 in fp16: its pooled features point where the fp32 ones do."""
    backbone = locate_manifest(models_dir, "efficientnet_lite0").parent / "backbone.onnx"
    half = fp16_graph(backbone, tmp_path)
    image = np.asarray(Image.fromarray(photo("chelsea")).resize((256, 192)), np.float32).transpose(2, 0, 1)[None]
    full, reduced = cpu(backbone, {"image": image}), cpu(half, {"image": image})
    for name in ("feat", "desc"):
        a, b = full[name].mean(axis=(2, 3)).ravel(), reduced[name].mean(axis=(2, 3)).ravel()
        assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) > 0.999
    assert int(full["logits"].argmax()) == int(reduced["logits"].argmax())


def test_calibration_images_come_in_full_batches_prepared_as_the_server_prepares_them(
    models_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "calibration"
    (folder / "more").mkdir(parents=True)
    for i, name in enumerate(("astronaut", "chelsea", "coffee", "rocket", "camera")):
        (folder / ("more" if i % 2 else ".") / f"{name}.jpg").write_bytes(encode(photo(name)))
    (folder / "notes.txt").write_text("not an image")
    shapes = ServingShapes(buckets=("4:3", "1:1"), long_side=256, max_batch=2, max_seeds=8)
    bundle = ModelBundle(locate_manifest(models_dir, "efficientnet_lite0"), EngineOptions(device="cpu"), shapes=shapes)
    batches = bundle._calibration(EngineOptions(device="tensorrt-native", precision="int8", calibration=folder))
    assert [b.shape for b in batches] == [(2, 3, 192, 256)] * 2  # five images: two full batches, first bucket
    assert all(b.dtype == np.float32 and b.min() >= 0 and b.max() <= 255 for b in batches)
    assert len(list(calibration_batches(folder, lambda data: np.zeros((3, 4, 4)), batch=5))) == 1

    before = calibration_digest(folder)
    (folder / "coffee.jpg").write_bytes(encode(photo("coins")))
    assert calibration_digest(folder) != before  # other images: another plan
    with pytest.raises(ValueError, match=r"no images .* under the calibration folder"):
        calibration_digest(tmp_path / "empty")
