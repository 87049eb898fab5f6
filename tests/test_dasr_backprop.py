"""Exactness of the DASR top-down pass (export/graphs.py DasrBackprop) against hand-worked values and
against the autograd reference of tests/excitation_reference.py (TorchRay-style excitation backprop).

Tiny nets are `Program`s built from programs.py ops with known weights; the expected probabilities
are worked out by hand in the comments. Real backbones: efficientnet_lite0 (real ImageNet weights),
resnet50 and vgg16 (RANDOM INIT, seeded: their real weights are user-supplied files). For them the
torch module is checked at every stop stride of the program, the exported ONNX graph (ONNX Runtime,
CPU) at the strides the session exports hold (lite0: 4 and 8; resnet50: 4; vgg16: 2).

Tolerance: each seed's map is divided by the reference map's largest value; graph and reference
must then agree within REL = 1e-4 everywhere (observed: about 1e-6).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
from excitation_reference import eltwise_sum, excitation_rules, folded_copy, with_eltwise_sums
from exports import LITE0_STRIDES, RESNET_STRIDE, VGG_STRIDE, backbone_dir
from photos import photo
from PIL import Image
from torch import nn
from torch.nn import functional as F

from inserve.engines import EngineOptions, open_engine
from inserve.export.backbones import BackboneSpec, LoadedBackbone, load_backbone
from inserve.export.graphs import DasrBackprop
from inserve.export.programs import Act, Add, Conv, Pool, Program
from inserve.server.stages.dasr import backpropagate_seeds
from inserve.server.stages.peaks import above_mean, mean_activation

REL = 1e-4
NO_PADS = (0, 0, 0, 0)


def tiny(ops: list, feat: str, stage_points: dict[int, str] | None = None) -> tuple[LoadedBackbone, Program]:
    """A hand-built backbone: the image goes in unnormalised (mean 0, std 1); a random two-class linear head."""
    program = Program(ops, feat=feat, desc=feat, stage_points=stage_points or {1: "image"}, size_multiple=1)
    spec = BackboneSpec("tiny", (0.0,) * 3, (1.0,) * 3, feat, "gap_linear", nn.Identity, lambda m, d: program)
    model = nn.Module()
    model.fc = nn.Linear(program.channels(feat), 2)
    return LoadedBackbone(spec, model, "hand-built"), program


def conv(src: str, dst: str, weight: list, pads=NO_PADS, stride: int = 1, groups: int = 1, bias=None) -> Conv:
    w = torch.tensor(weight, dtype=torch.float32)
    b = None if bias is None else torch.tensor(bias, dtype=torch.float32)
    return Conv(src, dst, w, b, stride, pads, groups)


def on_channel_0(kernel: list[list[float]]) -> list:
    """A 3 -> 1 channel weight that reads image channel 0 only."""
    zeros = [[0.0] * len(kernel[0]) for _ in kernel]
    return [[kernel, zeros, zeros]]


def image_from(channel_0: list[list[float]], others: float = 5.0) -> torch.Tensor:
    """(1, 3, H, W): channel 0 as given, channels 1 and 2 constant (the nets give them zero weight)."""
    c0 = torch.tensor(channel_0, dtype=torch.float32)
    return torch.stack([c0, torch.full_like(c0, others), torch.full_like(c0, others)])[None]


def run(loaded: LoadedBackbone, program: Program, image: torch.Tensor, seeds: list[list[tuple]], stride: int = 1):
    """Maps (B, S, h, w) for seeds[b] = [(y, x, value), ...], padded with zero-valued slots."""
    slots = max(len(s) for s in seeds)
    yx = torch.zeros(len(seeds), slots, 2, dtype=torch.long)
    value = torch.zeros(len(seeds), slots)
    for b, image_seeds in enumerate(seeds):
        for s, (y, x, v) in enumerate(image_seeds):
            yx[b, s] = torch.tensor([y, x])
            value[b, s] = v
    with torch.no_grad():
        return DasrBackprop(loaded, program, stride).eval()(image, yx, value)


# -- tiny nets, worked by hand -------------------------------------------------------------------------

KERNEL = [[0, 1, 0], [1, 2, -1], [0, 0, 0]]
PIXELS = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]


def test_conv_3x3_by_hand() -> None:
    """Eq. 3: P(input) = A * W+ / sum(A * W+) over the window; the negative weight gets nothing."""
    loaded, program = tiny(
        [conv("image", "c", on_channel_0(KERNEL), pads=(1, 1, 1, 1)), Act("c", "feat", "relu")], "feat"
    )
    maps = run(loaded, program, image_from(PIXELS), [[(1, 1, 1.0), (2, 2, 0.5), (0, 0, 1.0)]])[0]
    # seed (1,1): window = the whole image; A*W+ = 2*1 (up), 4*1 (left), 5*2 (centre); 6*(-1) is dropped. Z = 16
    np.testing.assert_allclose(maps[0], [[0, 2 / 16, 0], [4 / 16, 10 / 16, 0], [0, 0, 0]], rtol=1e-6)
    # seed (2,2), value 0.5: 6*1 (up), 8*1 (left), 9*2 (centre), the rest is padding. Z = 32
    np.testing.assert_allclose(maps[1], 0.5 * np.array([[0, 0, 0], [0, 0, 6 / 32], [0, 8 / 32, 18 / 32]]), rtol=1e-6)
    # seed (0,0): conv = 1*2 + 2*(-1) = 0, ReLU 0: the seed has no activation to spread, so no mass at all
    np.testing.assert_array_equal(maps[2], np.zeros((3, 3)))


SIGNED_PIXELS = [[2, -1, 0], [1, 3, -2], [0, 0, 0]]


def signed_net() -> tuple[LoadedBackbone, Program]:
    """A 3x3 conv with signed weights on a signed input, then ReLU."""
    kernel = [[1, 2, 0], [-1, 1, -1], [0, 0, 0]]
    return tiny([conv("image", "c", on_channel_0(kernel), pads=(1, 1, 1, 1)), Act("c", "feat", "relu")], "feat")


def test_signed_input_z_plus_rule_by_hand() -> None:
    """Signed inputs: positive inputs through positive weights and negative inputs through negative weights."""
    loaded, program = signed_net()
    (map_,) = run(loaded, program, image_from(SIGNED_PIXELS), [[(1, 1, 1.0)]])[0]
    # A*W over the window: 2*1 = 2, (-1)*2 = -2, 1*(-1) = -1, 3*1 = 3, (-2)*(-1) = 2: conv = 4 > 0.
    # (A*W)+ keeps 2, 3 and 2 (the last a negative input through a negative weight): Z = 7
    np.testing.assert_allclose(map_, [[2 / 7, 0, 0], [0, 3 / 7, 2 / 7], [0, 0, 0]], rtol=1e-6)
    assert map_.min() >= 0


POOL_PIXELS = [[1, 3, 0, 2], [0, 4, 5, 1], [2, 2, 1, 1], [0, 4, 3, 0]]


def pooled_net(kind: str, kernel: int, pads: tuple[int, int, int, int]) -> tuple[LoadedBackbone, Program]:
    """Identity 1x1 conv on channel 0, ReLU, then one pooling layer (stride 2) as `feat`."""
    ops = [
        conv("image", "c", on_channel_0([[1]])),
        Act("c", "r", "relu"),
        Pool("r", "feat", kind, kernel, 2, pads),
    ]
    return tiny(ops, "feat", {1: "image", 2: "feat"})


@pytest.mark.parametrize("kind", ["max", "avg"])
def test_pooling_is_an_all_ones_filter_2x2(kind: str) -> None:
    """Seed 004 III-A: a pooling layer passes probability in proportion to the activations, not to the argmax."""
    loaded, program = pooled_net(kind, 2, NO_PADS)
    maps = run(loaded, program, image_from(POOL_PIXELS), [[(0, 0, 1.0), (1, 1, 1.0)]])[0]
    expected = np.zeros((2, 4, 4))
    expected[0, :2, :2] = [[1 / 8, 3 / 8], [0, 4 / 8]]  # window [[1, 3], [0, 4]], sum 8
    expected[1, 2:, 2:] = [[1 / 5, 1 / 5], [3 / 5, 0]]  # window [[1, 1], [3, 0]], sum 5
    np.testing.assert_allclose(maps, expected, rtol=1e-6)


def test_pooling_3x3_stride_2_pad_1_by_hand() -> None:
    """ResNet's max pool: overlapping windows, zero padding counts nothing."""
    loaded, program = pooled_net("max", 3, (1, 1, 1, 1))
    maps = run(loaded, program, image_from(POOL_PIXELS), [[(0, 0, 1.0), (1, 1, 2.0)]])[0]
    expected = np.zeros((2, 4, 4))
    expected[0, :2, :2] = np.array([[1, 3], [0, 4]]) / 8  # rows/cols -1..1: the padding adds nothing
    expected[1, 1:, 1:] = 2 * np.array([[4, 5, 1], [2, 1, 1], [4, 3, 0]]) / 21  # rows/cols 1..3, sum 21
    np.testing.assert_allclose(maps, expected, rtol=1e-6)


def test_stop_stride_stops_at_the_stage_tensor() -> None:
    loaded, program = pooled_net("max", 2, NO_PADS)
    maps = run(loaded, program, image_from(POOL_PIXELS), [[(0, 1, 1.0)]], stride=2)
    # stopping at `feat` itself: the seed's own position, with its value
    np.testing.assert_allclose(maps[0, 0], [[0, 1], [0, 0]])


RESIDUAL_PIXELS = [[3, -1, 6, 2, -4, 5]]


def residual_net() -> tuple[LoadedBackbone, Program]:
    """s = a + b with signed branches a(x) = A(x) and b(x) = A(x + 1), then ReLU."""
    ops = [
        conv("image", "a", on_channel_0([[1]])),
        conv("image", "b", on_channel_0([[0, 0, 1]]), pads=(1, 1, 0, 0)),
        Add("a", "b", "s"),
        Act("s", "feat", "relu"),
    ]
    return tiny(ops, "feat")


def test_residual_sum_splits_by_positive_parts() -> None:
    """Each branch of a residual sum gets its positive part's share."""
    loaded, program = residual_net()
    seeds = [(0, x, 1.0) for x in range(5)]
    maps = run(loaded, program, image_from(RESIDUAL_PIXELS), [seeds])[0, :, 0]
    # a = [3, -1, 6, 2, -4, 5], b = [-1, 6, 2, -4, 5, 0], s = [2, 5, 8, -2, 1, 5]
    expected = [
        [1, 0, 0, 0, 0, 0],  # x=0: a+ = 3, b+ = 0: all to a, i.e. to pixel 0
        [0, 0, 1, 0, 0, 0],  # x=1: a+ = 0, b+ = 6: all to b, i.e. to pixel 2
        [0, 0, 0.75, 0.25, 0, 0],  # x=2: a+ = 6, b+ = 2: 3/4 to pixel 2, 1/4 to pixel 3
        [0, 0, 0, 0, 0, 0],  # x=3: s = -2, ReLU 0: no mass
        [0, 0, 0, 0, 0, 1],  # x=4: a+ = 0, b+ = 5: all to pixel 5
    ]
    np.testing.assert_allclose(maps, expected, rtol=1e-6, atol=1e-7)


SAME_PAD_PIXELS = [[1, 2, 3, 4], [5, 6, 7, 8], [1, 1, 1, 1], [2, 2, 2, 2]]


def same_pad_net() -> tuple[LoadedBackbone, Program]:
    """A 3x3 stride-2 conv with TensorFlow SAME padding (0, 1), then ReLU."""
    ops = [conv("image", "c", on_channel_0([[1, 1, 1], [1, 1, 1], [1, 1, 1]]), pads=(0, 1, 0, 1), stride=2)]
    return tiny([*ops, Act("c", "feat", "relu")], "feat")


def test_stride_2_conv_with_asymmetric_same_padding_by_hand() -> None:
    """EfficientNet's stride-2 convs pad (0, 1) (TensorFlow SAME); the transposed pass must crop alike."""
    loaded, program = same_pad_net()
    maps = run(loaded, program, image_from(SAME_PAD_PIXELS), [[(0, 0, 1.0), (1, 1, 1.0)]])[0]
    expected = np.zeros((2, 4, 4))
    expected[0, :3, :3] = np.array([[1, 2, 3], [5, 6, 7], [1, 1, 1]]) / 27  # window rows/cols 0..2
    expected[1, 2:, 2:] = np.array([[1, 1], [2, 2]]) / 6  # rows/cols 2..4, the 4th is padding
    np.testing.assert_allclose(maps, expected, rtol=1e-6)


# -- tiny random nets: conservation, signs, and the autograd reference ---------------------------------


class ProgramModule(nn.Module):
    """The program as plain torch calls (F.conv2d, F.max_pool2d, ...) that the reference's rules patch;
    each op is its own submodule so that a stop tensor can be captured with a forward hook."""

    class Step(nn.Module):
        def __init__(self, op) -> None:
            super().__init__()
            self.op = op

        def forward(self, x: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
            op = self.op
            if isinstance(op, Conv):
                return F.conv2d(F.pad(x, op.pads), op.weight, op.bias, op.stride, 0, 1, op.groups)
            if isinstance(op, Act):
                return F.relu(x) if op.kind == "relu" else F.relu6(x)
            if isinstance(op, Pool):
                assert op.kind == "max" and len(set(op.pads)) == 1
                return F.max_pool2d(x, op.kernel, op.stride, op.pads[0])
            return eltwise_sum(x, other)

    def __init__(self, program: Program) -> None:
        super().__init__()
        self.program = program
        self.steps = nn.ModuleDict({op.dst.replace(".", "_"): self.Step(op) for op in program.ops})

    def step(self, tensor: str) -> nn.Module:
        return self.steps[tensor.replace(".", "_")]

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        values = {"image": image}
        for op in self.program.ops:
            other = values[op.other] if isinstance(op, Add) else None
            values[op.dst] = self.step(op.dst)(values[op.src], other)
        return values[self.program.feat]


def random_net(bias: bool, seed: int = 0) -> tuple[LoadedBackbone, Program]:
    """conv 3x3 -> ReLU -> grouped conv (2 groups) -> ReLU -> max pool 3/2/1 -> 1x1 conv + residual -> ReLU."""
    g = torch.Generator().manual_seed(seed)

    def w(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    def b(n: int) -> torch.Tensor | None:
        return torch.randn(n, generator=g) * 0.5 if bias else None

    ops = [
        Conv("image", "c1", w(4, 3, 3, 3), b(4), 1, (1, 1, 1, 1)),
        Act("c1", "r1", "relu"),
        Conv("r1", "c2", w(4, 2, 3, 3), b(4), 1, (1, 1, 1, 1), groups=2),
        Act("c2", "r2", "relu"),
        Pool("r2", "p", "max", 3, 2, (1, 1, 1, 1)),
        Conv("p", "c3", w(4, 4, 1, 1), b(4), 1, NO_PADS),
        Add("c3", "p", "s"),
        Act("s", "feat", "relu"),
    ]
    return tiny(ops, "feat", {1: "image", 2: "p"})


def random_seeds(feat: torch.Tensor, count: int) -> list[tuple[int, int, float]]:
    activation = mean_activation(feat[0].numpy())
    return [(int(y), int(x), 1.0 + i) for i, (y, x) in enumerate(above_mean(activation)[:count])]


def reference(feat_fn, stops: dict[int, nn.Module | None], image: torch.Tensor, seeds) -> dict:
    """Autograd excitation backprop of each seed of each image (one forward per image, one backward per seed):
    {stride: (B, S, h, w)} with zero maps for padding slots. `image` is already normalised."""
    out: dict[int, list] = {stride: [] for stride in stops}
    for b, image_seeds in enumerate(seeds):
        captured: dict[int, torch.Tensor] = {}
        hooks = [
            stop.register_forward_hook(functools.partial(_capture_first, captured, stride))
            for stride, stop in stops.items()
            if stop is not None
        ]
        x = image[b : b + 1].clone().requires_grad_()
        with excitation_rules():
            feat = feat_fn(x)
        for hook in hooks:
            hook.remove()
        targets = [x if stop is None else captured[stride] for stride, stop in stops.items()]
        per_stride: dict[int, list] = {stride: [] for stride in stops}
        for y, xx, value in image_seeds:
            seed = torch.zeros_like(feat)
            column = feat[0, :, y, xx].clamp(min=0).detach()
            seed[0, :, y, xx] = value * column / column.sum()
            grads = torch.autograd.grad(feat, targets, seed, retain_graph=True)
            for stride, g in zip(stops, grads):
                per_stride[stride].append(g[0].sum(0))
        for stride in stops:
            maps = per_stride[stride]
            maps += [torch.zeros_like(maps[0])] * (max(len(s) for s in seeds) - len(maps))
            out[stride].append(torch.stack(maps))
    return {stride: torch.stack(maps).detach() for stride, maps in out.items()}


def _capture_first(captured: dict, key: int, module: nn.Module, inputs: object, output: torch.Tensor) -> None:
    captured.setdefault(key, output)


def assert_maps_match(got, expected) -> None:
    """Per seed, relative to the reference map's largest value (REL); zero reference maps must be zero."""
    got = np.asarray(got, dtype=np.float64).reshape(-1, *np.shape(got)[-2:])
    expected = np.asarray(expected, dtype=np.float64).reshape(got.shape)
    for g, e in zip(got, expected):
        scale = np.abs(e).max()
        if scale == 0:
            assert np.abs(g).max() == 0
            continue
        assert np.abs(g - e).max() / scale <= REL, np.abs(g - e).max() / scale


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_random_tiny_net_matches_the_autograd_reference(bias: bool) -> None:
    loaded, program = random_net(bias)
    image = torch.rand(2, 3, 12, 16, generator=torch.Generator().manual_seed(3)) * 4 - 2  # signed input
    module = ProgramModule(program)
    with torch.no_grad():
        feat = module(image)
    seeds = [random_seeds(feat[0:1], 4), random_seeds(feat[1:2], 2)]
    expected = reference(module, {1: None, 2: module.step("p")}, image, seeds)
    for stride in (1, 2):
        assert_maps_match(run(loaded, program, image, seeds, stride), expected[stride])


def test_probability_is_conserved_where_z_is_positive_and_never_negative() -> None:
    """Without biases every positive output has Z > 0 (through convs, sums and pools), so no mass is lost;
    with biases, mass is only ever lost (where Z = 0), never created, and never negative."""
    image = torch.rand(1, 3, 12, 16, generator=torch.Generator().manual_seed(4)) * 4 - 2
    for bias in (False, True):
        loaded, program = random_net(bias, seed=1)
        with torch.no_grad():
            feat = ProgramModule(program)(image)
        seeds = [random_seeds(feat, 6)]
        values = torch.tensor([v for _, _, v in seeds[0]])
        for stride in (1, 2):
            maps = run(loaded, program, image, seeds, stride)[0]
            assert maps.min() >= 0
            mass = maps.sum((1, 2))
            if bias:
                assert torch.all(mass <= values * (1 + 1e-5))
            else:
                torch.testing.assert_close(mass, values, rtol=1e-5, atol=0)


# -- real backbones ----------------------------------------------------------------------------------------

HEIGHT, WIDTH = 96, 64  # not the export's sample size (64 x 96): the ONNX graphs must be truly dynamic


@functools.cache
def backbone_case(name: str) -> dict:
    """The backbone, its program, the BN-folded reference model with its stop modules, two photos, seeds."""
    loaded = load_backbone(name, random_init=name != "efficientnet_lite0")
    program = loaded.spec.program(loaded.model, loaded.spec.default_desc)
    model = with_eltwise_sums(folded_copy(loaded.model))
    if name == "resnet50":
        m = model

        def feat_fn(x: torch.Tensor) -> torch.Tensor:
            return m.layer4(m.layer3(m.layer2(m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(x))))))))

        stops = {1: None, 2: m.relu, 4: m.maxpool, 8: m.layer2[0], 16: m.layer3[0]}
    elif name == "vgg16":
        feat_fn = model.features[:30]
        stops = {1: None, 2: model.features[4], 4: model.features[9], 8: model.features[16], 16: model.features[23]}
    else:
        feat_fn = model.extract_features
        blocks = model._blocks
        stops = {1: None, 2: model._swish, 4: blocks[1], 8: blocks[3], 16: blocks[5], 32: blocks[11]}
    assert sorted(stops) == sorted(program.stage_points), "the test must cover every stop stride"
    pixels = np.stack(
        [np.asarray(Image.fromarray(photo(p)).resize((WIDTH, HEIGHT), Image.BICUBIC)) for p in ("chelsea", "coffee")]
    )
    image = torch.from_numpy(pixels.transpose(0, 3, 1, 2).astype(np.float32))
    mean = torch.tensor(loaded.spec.mean).reshape(1, 3, 1, 1)
    std = torch.tensor(loaded.spec.std).reshape(1, 3, 1, 1)
    with torch.no_grad():
        feat = feat_fn((image - mean) / std)
    # unequal seed counts: three peaks in the first image, one in the second
    seeds = [random_seeds(feat[0:1], 3), random_seeds(feat[1:2], 1)]
    assert len(seeds[0]) == 3 and len(seeds[1]) == 1
    case = {"loaded": loaded, "program": program, "image": image, "seeds": seeds}
    case["expected"] = reference(feat_fn, stops, (image - mean) / std, seeds)
    return case


def stride_cases(name: str) -> list[tuple[str, int]]:
    strides = {"efficientnet_lite0": (1, 2, 4, 8, 16, 32), "resnet50": (1, 2, 4, 8, 16), "vgg16": (1, 2, 4, 8, 16)}
    return [(name, s) for s in strides[name]]


BACKBONE_STRIDES = [*stride_cases("efficientnet_lite0"), *stride_cases("resnet50"), *stride_cases("vgg16")]


@pytest.mark.parametrize(("name", "stride"), BACKBONE_STRIDES, ids=[f"{n}-s{s}" for n, s in BACKBONE_STRIDES])
def test_torch_graph_matches_the_reference(name: str, stride: int) -> None:
    case = backbone_case(name)
    maps = run(case["loaded"], case["program"], case["image"], case["seeds"], stride)
    h, w = HEIGHT // stride, WIDTH // stride
    assert maps.shape == (2, 3, h, w)
    assert maps.min() >= 0
    assert_maps_match(maps, case["expected"][stride])
    np.testing.assert_array_equal(maps[1, 1:], 0)  # the padding slots of the second image


@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet50", "vgg16"])
def test_batched_seeds_equal_each_image_alone(name: str) -> None:
    """Two images in one batch with 3 and 1 seeds (two zero-valued padding slots) = each image on its own."""
    case = backbone_case(name)
    stride = 8
    together = run(case["loaded"], case["program"], case["image"], case["seeds"], stride)
    first = run(case["loaded"], case["program"], case["image"][0:1], case["seeds"][:1], stride)
    second = run(case["loaded"], case["program"], case["image"][1:2], case["seeds"][1:], stride)
    torch.testing.assert_close(together[0], first[0], rtol=1e-5, atol=1e-6 * float(first.abs().max()))
    torch.testing.assert_close(together[1, :1], second[0], rtol=1e-5, atol=1e-6 * float(second.abs().max()))


ONNX_CASES = [("efficientnet_lite0", s) for s in LITE0_STRIDES] + [("resnet50", RESNET_STRIDE), ("vgg16", VGG_STRIDE)]


def onnx_file(request: pytest.FixtureRequest, name: str, stride: int) -> Path:
    import json

    directory = backbone_dir(request, name)
    manifest = json.loads((directory / "manifest.json").read_text())
    return directory / manifest["graphs"]["dasr_backprop"]["strides"][str(stride)]["file"]


@pytest.mark.parametrize(("name", "stride"), ONNX_CASES, ids=[f"{n}-s{s}" for n, s in ONNX_CASES])
def test_exported_onnx_graph_matches_the_reference(request: pytest.FixtureRequest, name: str, stride: int) -> None:
    case = backbone_case(name)
    engine = open_engine(onnx_file(request, name, stride), EngineOptions(device="cpu"))
    seeds = case["seeds"]
    yx = np.zeros((2, 3, 2), dtype=np.int64)
    value = np.zeros((2, 3), dtype=np.float32)
    for b, image_seeds in enumerate(seeds):
        for s, (y, x, v) in enumerate(image_seeds):
            yx[b, s], value[b, s] = (y, x), v
    maps = engine.run({"image": case["image"].numpy(), "seed_yx": yx, "seed_value": value})["maps"]
    assert maps.shape == (2, 3, HEIGHT // stride, WIDTH // stride)
    assert maps.min() >= 0
    assert_maps_match(maps, case["expected"][stride])


def test_onnx_seed_batching_through_the_service_helper(request: pytest.FixtureRequest) -> None:
    """server/stages/dasr.backpropagate_seeds: a batch of two images with 5 and 2 seeds, spread over several
    runs of at most 4 seed rows, gives each image's maps as when it runs alone in one run."""
    case = backbone_case("efficientnet_lite0")
    engine = open_engine(onnx_file(request, "efficientnet_lite0", 8), EngineOptions(device="cpu"))
    pixels = case["image"].numpy()
    feat_h, feat_w = HEIGHT // 32, WIDTH // 32
    seeds = [
        np.array([[0, 0], [1, 1], [2, 0], [1, 0], [0, 1]], dtype=np.int64),
        np.array([[2, 1], [0, 0]], dtype=np.int64),
    ]
    assert all(s[:, 0].max() < feat_h and s[:, 1].max() < feat_w for s in seeds)
    together = backpropagate_seeds(engine, pixels, seeds, per_run=4)
    assert [m.shape for m in together] == [(5, HEIGHT // 8, WIDTH // 8), (2, HEIGHT // 8, WIDTH // 8)]
    for b in range(2):
        (alone,) = backpropagate_seeds(engine, pixels[b : b + 1], seeds[b : b + 1], per_run=64)
        np.testing.assert_allclose(together[b], alone, rtol=1e-4, atol=1e-6 * float(np.abs(alone).max()))
