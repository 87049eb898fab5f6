"""Exactness of the adjoint DASR graph (export/graphs.py DasrMoments): for every cell of `feat` as a seed, the
functionals it pulls up equal the same functionals summed over the explicit map that DasrBackprop gives that
seed. Checked on the hand-built nets of test_dasr_backprop.py (every layer type: convolutions with stride,
asymmetric padding and groups, signed inputs, max and average pooling, residual sums, ReLU) with random
functionals, and on efficientnet_lite0 (real weights) and resnet50 (RANDOM INIT, seeded) at stop strides 4, 8
and 16 with the box moments; then the exported ONNX graph and the service's padded-batch helper.

Tolerance: float32 rounding. Each functional's difference is divided by the largest magnitude of that
functional over all cells; TOL = 1e-4 (observed: about 1e-6).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from exports import LITE0_STRIDES, RESNET_STRIDE, backbone_dir
from test_dasr_backprop import (
    HEIGHT,
    KERNEL,
    NO_PADS,
    PIXELS,
    POOL_PIXELS,
    RESIDUAL_PIXELS,
    SAME_PAD_PIXELS,
    SIGNED_PIXELS,
    WIDTH,
    backbone_case,
    conv,
    image_from,
    on_channel_0,
    pooled_net,
    random_net,
    residual_net,
    same_pad_net,
    signed_net,
    tiny,
)

from inserve.engines import EngineOptions, open_engine
from inserve.export.graphs import DasrBackprop, DasrMoments, seed_side
from inserve.export.programs import Act, Add, Conv
from inserve.server.stages.buckets import valid_cells
from inserve.server.stages.dasr import backpropagate_seeds, seed_moments
from inserve.server.stages.shapes import MOMENTS, map_moments, moment_functionals

TOL = 1e-4


def every_cell_maps(loaded, program, image: torch.Tensor, stride: int) -> torch.Tensor:
    """(B, h*w, H/s, W/s): DasrBackprop's map of a unit seed at every cell of `feat`, raster order."""
    with torch.no_grad():
        feat = DasrMoments(loaded, program, stride)._activations(image)[program.feat]
        h, w = feat.shape[2:]
        yx = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1).reshape(1, -1, 2)
        yx = yx.expand(image.shape[0], -1, -1).contiguous()
        return DasrBackprop(loaded, program, stride)(image, yx, torch.ones(yx.shape[:2]))


def pulled_up(loaded, program, image: torch.Tensor, functionals: torch.Tensor, stride: int) -> torch.Tensor:
    """(B, K, h*w): the adjoint graph's value of each functional for every cell."""
    with torch.no_grad():
        return DasrMoments(loaded, program, stride)(image, functionals)[-1].flatten(2)


def assert_functionals_match(got, expected) -> None:
    """got, expected (B, K, cells): per image and functional, relative to its largest magnitude."""
    got, expected = np.asarray(got, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert got.shape == expected.shape
    for g, e in zip(got.reshape(-1, got.shape[-1]), expected.reshape(-1, expected.shape[-1])):
        scale = np.abs(e).max()
        if scale == 0:
            assert np.abs(g).max() == 0
        else:
            assert np.abs(g - e).max() / scale <= TOL, np.abs(g - e).max() / scale


def check_random_functionals(loaded, program, image: torch.Tensor, stride: int, k: int = 4) -> None:
    maps = every_cell_maps(loaded, program, image, stride)
    functionals = torch.rand(image.shape[0], k, *maps.shape[2:], generator=torch.Generator().manual_seed(7)) - 0.3
    expected = torch.einsum("bkhw,bnhw->bkn", functionals.double(), maps.double())
    assert_functionals_match(pulled_up(loaded, program, image, functionals, stride), expected)


# -- hand-built nets, one per layer type ---------------------------------------------------------------


def test_conv_3x3_with_a_seed_that_has_no_mass() -> None:
    loaded, program = tiny(
        [conv("image", "c", on_channel_0(KERNEL), pads=(1, 1, 1, 1)), Act("c", "feat", "relu")], "feat"
    )
    image = image_from(PIXELS)
    check_random_functionals(loaded, program, image, 1)
    # cell (0, 0) has no activation (test_conv_3x3_by_hand): every functional of its (empty) map is 0
    mass = pulled_up(loaded, program, image, torch.ones(1, 1, 3, 3), 1)[0, 0]
    assert mass[0] == 0 and torch.allclose(mass[4], torch.tensor(1.0))


def test_signed_input() -> None:
    loaded, program = signed_net()
    check_random_functionals(loaded, program, image_from(SIGNED_PIXELS), 1)


@pytest.mark.parametrize(("kind", "kernel", "pads"), [("max", 2, NO_PADS), ("avg", 2, NO_PADS), ("max", 3, (1,) * 4)])
def test_pooling(kind: str, kernel: int, pads: tuple) -> None:
    loaded, program = pooled_net(kind, kernel, pads)
    for stride in (1, 2):
        check_random_functionals(loaded, program, image_from(POOL_PIXELS), stride)


def test_residual_sum() -> None:
    loaded, program = residual_net()
    check_random_functionals(loaded, program, image_from(RESIDUAL_PIXELS), 1)


def test_stride_2_conv_with_asymmetric_same_padding() -> None:
    loaded, program = same_pad_net()
    check_random_functionals(loaded, program, image_from(SAME_PAD_PIXELS), 1)


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_random_net_with_groups_pooling_and_residual(bias: bool) -> None:
    loaded, program = random_net(bias)
    image = torch.rand(2, 3, 12, 16, generator=torch.Generator().manual_seed(3)) * 4 - 2
    for stride in (1, 2):
        check_random_functionals(loaded, program, image, stride)


def pointwise_start_net() -> tuple:
    """Above the image: 1x1 conv (signed input), a strided 1x1 conv, a 1x1 conv summed with its own input, then
    a 3x3 conv: the functionals stay one map per image through the 1x1 part (DasrMoments, Channel-constant start)."""
    g = torch.Generator().manual_seed(5)

    def w(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    ops = [
        Conv("image", "a", w(4, 3, 1, 1), w(4) * 0.5, 1, NO_PADS),
        Act("a", "ar", "relu"),
        Conv("ar", "b", w(4, 4, 1, 1), w(4) * 0.5, 2, NO_PADS),
        Act("b", "br", "relu"),
        Conv("br", "c", w(4, 4, 1, 1), w(4) * 0.5, 1, NO_PADS),
        Add("c", "br", "s"),
        Act("s", "sr", "relu"),
        Conv("sr", "d", w(4, 4, 3, 3), w(4) * 0.5, 1, (1, 1, 1, 1)),
        Act("d", "feat", "relu"),
    ]
    return tiny(ops, "feat", {1: "image", 2: "br"})


def test_pointwise_layers_above_the_stop() -> None:
    loaded, program = pointwise_start_net()
    image = torch.rand(2, 3, 8, 10, generator=torch.Generator().manual_seed(4)) * 4 - 2
    for stride in (1, 2):
        check_random_functionals(loaded, program, image, stride)


def test_the_seed_side_is_the_top_that_keeps_each_cell_apart() -> None:
    """DasrMoments pushes the seed down through the top's 1x1 convolutions, activations and residual sums (the
    exactness tests above cover the moments); here, which ops those are and where the functionals stop."""

    def sides(loaded, program, stride: int) -> tuple[list[str], list[str]]:
        side, frontier = seed_side(program, DasrMoments(loaded, program, stride).steps)
        return [program.ops[i].dst for i in side], frontier

    lite0 = backbone_case("efficientnet_lite0")
    side, frontier = sides(lite0["loaded"], lite0["program"], 8)
    assert side == ["blocks.15.depthwise", "blocks.15", "head.linear", "head"]
    assert frontier == ["blocks.15.depthwise.linear"]  # the last 3x3 depthwise convolution's output
    resnet = backbone_case("resnet50")
    side, frontier = sides(resnet["loaded"], resnet["program"], 8)
    assert side == ["layer4.2.relu2", "layer4.2.conv3", "layer4.2.sum", "layer4.2"]
    assert frontier == ["layer4.2.conv2", "layer4.1"]  # the 3x3 branch and the identity, which conv1 also reads
    # one branch is pointwise down to the stop tensor (the image), where the functionals meet the seed unmoved
    assert sides(*residual_net(), 1)[1] == ["image", "b"]


def test_a_layer_without_an_excitation_rule_is_refused_by_name() -> None:
    loaded, program = tiny([conv("image", "c", on_channel_0([[1]])), Act("c", "feat", "sigmoid")], "feat")
    with pytest.raises(ValueError, match=r"'feat'.*no excitation rule"):
        DasrMoments(loaded, program, 1)


# -- real backbones: the box moments of every cell ---------------------------------------------------------

BACKBONE_STRIDES = [(name, s) for name in ("efficientnet_lite0", "resnet50") for s in (4, 8, 16)]


@pytest.mark.parametrize(("name", "stride"), BACKBONE_STRIDES, ids=[f"{n}-s{s}" for n, s in BACKBONE_STRIDES])
def test_adjoint_moments_equal_the_moments_of_every_cells_map(name: str, stride: int) -> None:
    case = backbone_case(name)
    loaded, program, image = case["loaded"], case["program"], case["image"]
    maps = every_cell_maps(loaded, program, image, stride)  # (2, 6, h, w): feat is 3 x 2 cells
    assert maps.shape[1] == (HEIGHT // 32) * (WIDTH // 32)
    shape = maps.shape[2:]
    functionals = torch.from_numpy(moment_functionals(shape, shape)).expand(2, -1, -1, -1)
    expected = np.stack([map_moments(m.numpy()).T for m in maps])  # (2, K, cells)
    assert expected[:, 0].min() > 0  # every seed carries mass to the stop layer
    assert_functionals_match(pulled_up(loaded, program, image, functionals, stride), expected)


def moments_file(request: pytest.FixtureRequest, name: str, stride: int, graph: str = "dasr_moments") -> Path:
    directory = backbone_dir(request, name)
    manifest = json.loads((directory / "manifest.json").read_text())
    return directory / manifest["graphs"][graph]["strides"][str(stride)]["file"]


ONNX_CASES = [("efficientnet_lite0", s) for s in LITE0_STRIDES] + [("resnet50", RESNET_STRIDE)]


@pytest.mark.parametrize(("name", "stride"), ONNX_CASES, ids=[f"{n}-s{s}" for n, s in ONNX_CASES])
def test_exported_graph_equals_the_explicit_maps_moments(request: pytest.FixtureRequest, name: str, stride: int):
    case = backbone_case(name)
    maps = every_cell_maps(case["loaded"], case["program"], case["image"], stride)
    shape = tuple(maps.shape[2:])
    functionals = np.broadcast_to(moment_functionals(shape, shape), (2, len(MOMENTS), *shape))
    engine = open_engine(moments_file(request, name, stride), EngineOptions(device="cpu"))
    outputs = engine.run({"image": case["image"].numpy(), "functionals": np.ascontiguousarray(functionals)})
    got = outputs.pop("moments")
    assert got.shape == (2, len(MOMENTS), HEIGHT // 32, WIDTH // 32)
    expected = np.stack([map_moments(m.numpy()).T for m in maps])
    assert_functionals_match(got.reshape(2, len(MOMENTS), -1), expected)
    # the backbone's maps, from the same forward pass, are the backbone graph's
    backbone = json.loads((backbone_dir(request, name) / "manifest.json").read_text())["graphs"]["backbone"]
    alone = open_engine(backbone_dir(request, name) / backbone["file"], EngineOptions(device="cpu"))
    expected_maps = alone.run({"image": case["image"].numpy()})
    assert set(outputs) == set(expected_maps) == {"feat", "desc", "logits"}
    for output, value in outputs.items():
        np.testing.assert_allclose(value, expected_maps[output], rtol=1e-4, atol=1e-4 * np.abs(value).max())


def test_padded_batch_moments_count_only_each_images_own_cells(request: pytest.FixtureRequest) -> None:
    """server/stages/dasr.seed_moments on a bucket-padded batch: image 1 fills only the top-left 64 x 32 pixels,
    so its moments are those of the exact maps cropped to its own cells, as the exact mode crops them."""
    case = backbone_case("efficientnet_lite0")
    stride = 8
    pixels = case["image"].numpy().copy()
    sizes = [(HEIGHT, WIDTH), (64, 32)]
    pixels[1, :, 64:, :] = pixels[1, :, :, 32:] = 127.0  # the padding is the normalisation mean, roughly
    feat = [np.zeros((1, 3, 2)), np.zeros((1, 2, 1))]  # only the cell counts matter here
    moments_engine = open_engine(moments_file(request, "efficientnet_lite0", stride), EngineOptions(device="cpu"))
    got = seed_moments(moments_engine, stride, pixels, feat, sizes)
    assert [g.shape for g in got] == [(len(MOMENTS), 3, 2), (len(MOMENTS), 2, 1)]
    backprop = open_engine(moments_file(request, "efficientnet_lite0", stride, "dasr_backprop"), EngineOptions())
    for b, (f, size) in enumerate(zip(feat, sizes)):
        h, w = f.shape[1:]
        cells = np.argwhere(np.ones((h, w), dtype=bool))
        (maps,) = backpropagate_seeds(backprop, pixels[b : b + 1], [cells], per_run=64)
        rows, cols = valid_cells(size, stride)
        expected = map_moments(maps[:, :rows, :cols]).T.reshape(len(MOMENTS), h, w)
        assert_functionals_match(got[b].reshape(1, len(MOMENTS), -1), expected.reshape(1, len(MOMENTS), -1))
