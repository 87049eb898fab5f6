"""Backbones as layer programs: a flat list of conv / activation / pool / add ops on named tensors.

A program is what both exported graphs are written from: the forward graph runs it, the DASR
top-down graph walks it backwards. BatchNorm is folded into the convolutions here, once.
Every program expects inputs whose height and width are multiples of its `size_multiple`, so
that every stride-2 layer sees an even size and all paddings are static (this is what makes
TensorFlow "SAME" padding of EfficientNet and the transposed convolutions exact).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

Pads = tuple[int, int, int, int]  # left, right, top, bottom


@dataclass
class Conv:
    """Convolution with BatchNorm folded in; `pads` are applied before a padding-free conv."""

    src: str
    dst: str
    weight: torch.Tensor
    bias: torch.Tensor | None
    stride: int
    pads: Pads
    groups: int = 1


ACTIVATIONS = ("relu", "relu6")  # the activations the top-down pass goes straight through


@dataclass
class Act:
    """ReLU or ReLU6: the top-down pass goes straight through it."""

    src: str
    dst: str
    kind: str  # one of ACTIVATIONS


@dataclass
class Pool:
    """Max or average pooling; the top-down pass treats it as an all-ones filter per channel."""

    src: str
    dst: str
    kind: str  # "max" | "avg"
    kernel: int
    stride: int
    pads: Pads


@dataclass
class Add:
    src: str
    other: str
    dst: str


Op = Conv | Act | Pool | Add


@dataclass
class Program:
    """A backbone up to its last conv map `feat`, with the names of the tensors users need."""

    ops: list[Op]
    feat: str
    desc: str
    # stride -> the first tensor at that stride through which every path passes (1 = "image")
    stage_points: dict[int, str]
    size_multiple: int
    strides: dict[str, int] = field(init=False)
    signed: set[str] = field(init=False)

    def __post_init__(self) -> None:
        self.strides, self.signed = {"image": 1}, {"image"}
        for op in self.ops:
            if isinstance(op, Add):
                self.strides[op.dst] = self.strides[op.src]
                if op.src in self.signed or op.other in self.signed:
                    self.signed.add(op.dst)
            elif isinstance(op, Act):
                self.strides[op.dst] = self.strides[op.src]
            else:
                self.strides[op.dst] = self.strides[op.src] * op.stride
                if isinstance(op, Conv) or op.src in self.signed:
                    self.signed.add(op.dst)

    def channels(self, tensor: str) -> int:
        """Number of channels of a tensor (3 for the image)."""
        if tensor == "image":
            return 3
        op = self.ops[self.op_index(tensor)]
        return op.weight.shape[0] if isinstance(op, Conv) else self.channels(op.src)

    def op_index(self, tensor: str) -> int:
        """Index of the op that produces `tensor` (-1 for the image)."""
        if tensor == "image":
            return -1
        return next(i for i, op in enumerate(self.ops) if op.dst == tensor)


def run_program(program: Program, image: torch.Tensor, keep: set[str]) -> dict[str, torch.Tensor]:
    """Forward pass; returns the tensors named in `keep`."""
    values = {"image": image}
    last_use = _last_uses(program.ops)
    for i, op in enumerate(program.ops):
        values[op.dst] = apply_forward(op, values)
        for name in last_use.get(i, ()):
            if name not in keep:
                del values[name]
    return {name: values[name] for name in keep}


def apply_forward(op: Op, values: dict[str, torch.Tensor]) -> torch.Tensor:
    x = values[op.src]
    if isinstance(op, Conv):
        return F.conv2d(F.pad(x, op.pads), op.weight, op.bias, stride=op.stride, groups=op.groups)
    if isinstance(op, Act):
        return F.relu(x) if op.kind == "relu" else F.relu6(x)
    if isinstance(op, Pool):
        if op.kind == "max":
            return F.max_pool2d(F.pad(x, op.pads, value=float("-inf")), op.kernel, op.stride)
        return F.avg_pool2d(F.pad(x, op.pads), op.kernel, op.stride)
    return x + values[op.other]


def _last_uses(ops: list[Op]) -> dict[int, list[str]]:
    last: dict[str, int] = {}
    for i, op in enumerate(ops):
        for name in (op.src, op.other) if isinstance(op, Add) else (op.src,):
            last[name] = i
    by_op: dict[int, list[str]] = {}
    for name, i in last.items():
        by_op.setdefault(i, []).append(name)
    return by_op


def fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weights and bias of `bn(conv(x))` as one convolution (eval-mode statistics)."""
    weight = conv.weight.detach().clone()
    bias = None if conv.bias is None else conv.bias.detach().clone()
    if bn is None:
        return weight, bias
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    weight = weight * scale.reshape(-1, 1, 1, 1)
    bias = (torch.zeros_like(scale) if bias is None else bias) - bn.running_mean
    return weight, bias * scale + bn.bias.detach()


def _symmetric(p: int) -> Pads:
    return (p, p, p, p)


def same_pads(kernel: int, stride: int) -> Pads:
    """TensorFlow SAME padding for an even input size (all sizes here are)."""
    total = kernel - stride
    lo = total // 2
    return (lo, total - lo, lo, total - lo)


class _Builder:
    def __init__(self) -> None:
        self.ops: list[Op] = []
        self.last = "image"

    def conv(self, name: str, conv: nn.Conv2d, bn: nn.BatchNorm2d | None, pads: Pads, src: str | None = None) -> str:
        weight, bias = fold_batchnorm(conv, bn)
        stride = conv.stride[0]
        self.ops.append(Conv(src or self.last, name, weight, bias, stride, pads, conv.groups))
        self.last = name
        return name

    def act(self, name: str, kind: str) -> str:
        self.ops.append(Act(self.last, name, kind))
        self.last = name
        return name

    def pool(self, name: str, kind: str, kernel: int, stride: int, pads: Pads) -> str:
        self.ops.append(Pool(self.last, name, kind, kernel, stride, pads))
        self.last = name
        return name

    def add(self, name: str, src: str, other: str) -> str:
        self.ops.append(Add(src, other, name))
        self.last = name
        return name


def resnet_program(model: nn.Module, desc: str = "layer4.0") -> Program:
    """torchvision ResNet-50 (Bottleneck, stride on the 3x3 conv as in torchvision's v1.5)."""
    b = _Builder()
    b.conv("conv1", model.conv1, model.bn1, _symmetric(3))
    b.act("relu", "relu")
    b.pool("maxpool", "max", 3, 2, _symmetric(1))
    for layer_name in ("layer1", "layer2", "layer3", "layer4"):
        for i, block in enumerate(getattr(model, layer_name)):
            name = f"{layer_name}.{i}"
            entry = b.last
            b.conv(f"{name}.conv1", block.conv1, block.bn1, _symmetric(0))
            b.act(f"{name}.relu1", "relu")
            b.conv(f"{name}.conv2", block.conv2, block.bn2, _symmetric(1))
            b.act(f"{name}.relu2", "relu")
            branch = b.conv(f"{name}.conv3", block.conv3, block.bn3, _symmetric(0))
            identity = entry
            if block.downsample is not None:
                identity = b.conv(
                    f"{name}.downsample", block.downsample[0], block.downsample[1], _symmetric(0), src=entry
                )
            b.add(f"{name}.sum", branch, identity)
            b.act(name, "relu")
    stage_points = {1: "image", 2: "relu", 4: "maxpool", 8: "layer2.0", 16: "layer3.0"}
    return Program(b.ops, feat="layer4.2", desc=desc, stage_points=stage_points, size_multiple=32)


def vgg_program(model: nn.Module, desc: str = "conv5_1") -> Program:
    """torchvision VGG-16 `features` up to conv5_3 (stride 16); pool5 belongs to the classifier."""
    b = _Builder()
    block, index, stage_points = 1, 1, {1: "image"}
    for layer in list(model.features)[:-1]:
        if isinstance(layer, nn.Conv2d):
            b.conv(f"conv{block}_{index}.linear", layer, None, _symmetric(layer.padding[0]))
        elif isinstance(layer, nn.ReLU):
            b.act(f"conv{block}_{index}", "relu")
            index += 1
        else:
            b.pool(f"pool{block}", "max", layer.kernel_size, layer.stride, _symmetric(0))
            stage_points[2**block] = f"pool{block}"
            block, index = block + 1, 1
    return Program(b.ops, feat="conv5_3", desc=desc, stage_points=stage_points, size_multiple=32)


def efficientnet_program(model: nn.Module, desc: str) -> Program:
    """EfficientNet-Lite from `efficientnet_lite_pytorch` (ReLU6, no squeeze-excitation)."""
    b = _Builder()
    b.conv("stem.linear", model._conv_stem, model._bn0, same_pads(3, 2))
    b.act("stem", "relu6")
    stage_points = {1: "image", 2: "stem"}
    stride = 2
    for i, block in enumerate(model._blocks):
        args = block._block_args
        if block.has_se:
            raise ValueError("squeeze-excitation blocks are not supported (EfficientNet-Lite has none)")
        entry = b.last
        if args.expand_ratio != 1:
            b.conv(f"blocks.{i}.expand.linear", block._expand_conv, block._bn0, _symmetric(0))
            b.act(f"blocks.{i}.expand", "relu6")
        conv = block._depthwise_conv
        s = conv.stride[0]
        b.conv(f"blocks.{i}.depthwise.linear", conv, block._bn1, same_pads(conv.kernel_size[0], s))
        b.act(f"blocks.{i}.depthwise", "relu6")
        branch = b.conv(f"blocks.{i}.project", block._project_conv, block._bn2, _symmetric(0))
        if args.id_skip and s == 1 and args.input_filters == args.output_filters:
            b.add(f"blocks.{i}", branch, entry)
        else:
            b.ops[-1].dst = b.last = f"blocks.{i}"
        if s == 2:
            stride *= 2
            stage_points.setdefault(stride, f"blocks.{i}")
    b.conv("head.linear", model._conv_head, model._bn1, _symmetric(0))
    b.act("head", "relu6")
    return Program(b.ops, feat="head", desc=desc, stage_points=stage_points, size_multiple=32)
