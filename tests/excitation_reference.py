"""Reference excitation back-propagation with autograd, for tests only.

Written the TorchRay way, independently of the exported graph: the original torch model runs
with `torch.nn.functional` patched so that each layer's backward applies its excitation rule,
and `torch.autograd.grad` from the seeded last conv map gives the probabilities at any tensor.
BatchNorm is folded into the convolutions first, residual sums go through an explicit
`eltwise_sum` (TorchRay's `update_resnet` trick), activations pass probabilities through.
The rules are the ones `DasrBackprop` documents (z+ for signed inputs, all-ones pooling,
positive-part split of residual sums).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.autograd import Function
from torch.nn import functional as F

_ORIGINAL = {name: getattr(F, name) for name in ("conv2d", "max_pool2d", "avg_pool2d", "relu", "relu6", "hardtanh")}


def _signed_terms(x: torch.Tensor, weight: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """z+ rule: positive inputs through positive weights, negative inputs through negative weights."""
    return [(x.clamp(min=0), weight.clamp(min=0)), (x.clamp(max=0), weight.clamp(max=0))]


class _ExcitationConv(Function):
    @staticmethod
    def forward(ctx, x, weight, bias, *args):
        ctx.save_for_backward(x, weight)
        ctx.args = args
        return _ORIGINAL["conv2d"](x, weight, bias, *args)

    @staticmethod
    def backward(ctx, p_out):
        x, weight = ctx.saved_tensors
        p_in = torch.zeros_like(x)
        with torch.enable_grad():
            inputs = [(a.detach().requires_grad_(), w) for a, w in _signed_terms(x, weight)]
            z = sum(_ORIGINAL["conv2d"](a, w, None, *ctx.args) for a, w in inputs)
            s = torch.where(z > 0, p_out / z, torch.zeros_like(z))
            grads = torch.autograd.grad(z, [a for a, _ in inputs], s)
        for (a, _), g in zip(inputs, grads):
            p_in = p_in + a.detach() * g
        return (p_in, None, None, *([None] * len(ctx.args)))


class _ExcitationPool(Function):
    """Pooling as an all-ones filter on one-to-one channel pairs, zero padding."""

    @staticmethod
    def forward(ctx, x, kernel_size, stride=None, padding=0, *rest):
        ctx.save_for_backward(x)
        ctx.geometry = (kernel_size, stride, padding)
        ctx.n_args = 3 + len(rest)
        return _ORIGINAL["max_pool2d"](x, kernel_size, stride, padding, *rest)

    @staticmethod
    def backward(ctx, p_out):
        (x,) = ctx.saved_tensors
        kernel, stride, padding = ctx.geometry
        with torch.enable_grad():
            a = x.clamp(min=0).detach().requires_grad_()
            z = _ORIGINAL["avg_pool2d"](a, kernel, stride, padding, count_include_pad=True)
            s = torch.where(z > 0, p_out / z, torch.zeros_like(z))
            (g,) = torch.autograd.grad(z, a, s)
        return (a.detach() * g, *([None] * ctx.n_args))


class _PassThrough(Function):
    @staticmethod
    def forward(ctx, x, fn, *args):
        ctx.n_args = 1 + len(args)
        return fn(x, *args)

    @staticmethod
    def backward(ctx, p_out):
        return (p_out, *([None] * ctx.n_args))


class _EltwiseSum(Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a + b

    @staticmethod
    def backward(ctx, p_out):
        a, b = (t.clamp(min=0) for t in ctx.saved_tensors)
        total = a + b
        safe = torch.where(total > 0, total, torch.ones_like(total))
        return p_out * a / safe * (total > 0), p_out * b / safe * (total > 0)


eltwise_sum = _EltwiseSum.apply


@contextlib.contextmanager
def excitation_rules() -> Iterator[None]:
    patches = {
        "conv2d": _ExcitationConv.apply,
        "max_pool2d": lambda x, *a, **k: _ExcitationPool.apply(x, *a),
        "relu": lambda x, inplace=False: _PassThrough.apply(x, _ORIGINAL["relu"]),
        "relu6": lambda x, inplace=False: _PassThrough.apply(x, _ORIGINAL["relu6"]),
        "hardtanh": lambda x, lo=-1.0, hi=1.0, inplace=False: _PassThrough.apply(x, _ORIGINAL["hardtanh"], lo, hi),
    }
    for name, fn in patches.items():
        setattr(F, name, fn)
    try:
        yield
    finally:
        for name, fn in _ORIGINAL.items():
            setattr(F, name, fn)


def folded_copy(model: nn.Module) -> nn.Module:
    """A copy with each BatchNorm folded into the convolution registered just before it."""
    model = copy.deepcopy(model).eval()
    last_conv: nn.Conv2d | None = None
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.Conv2d):
                last_conv = child
            elif isinstance(child, nn.BatchNorm2d):
                assert last_conv is not None and last_conv.out_channels == child.num_features
                scale = child.weight / torch.sqrt(child.running_var + child.eps)
                bias = last_conv.bias if last_conv.bias is not None else torch.zeros_like(scale)
                last_conv.weight = nn.Parameter(last_conv.weight * scale.reshape(-1, 1, 1, 1))
                last_conv.bias = nn.Parameter((bias - child.running_mean) * scale + child.bias)
                setattr(parent, child_name, nn.Identity())
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _bottleneck_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    identity = self.downsample(x) if self.downsample is not None else x
    return self.relu(eltwise_sum(out, identity))


def _mbconv_forward(self: nn.Module, inputs: torch.Tensor, drop_connect_rate: float | None = None) -> torch.Tensor:
    args = self._block_args
    x = inputs
    if args.expand_ratio != 1:
        x = self._swish(self._bn0(self._expand_conv(inputs)))
    x = self._swish(self._bn1(self._depthwise_conv(x)))
    x = self._bn2(self._project_conv(x))
    stride = args.stride[0] if isinstance(args.stride, list) else args.stride
    if args.id_skip and stride == 1 and args.input_filters == args.output_filters:
        x = eltwise_sum(x, inputs)
    return x


def with_eltwise_sums(model: nn.Module) -> nn.Module:
    from torchvision.models.resnet import Bottleneck

    for module in model.modules():
        if isinstance(module, Bottleneck):
            module.forward = _bottleneck_forward.__get__(module)
        elif type(module).__name__ == "MBConvBlock":
            module.forward = _mbconv_forward.__get__(module)
    return model


def first_output_into(captured: list[torch.Tensor]) -> Callable:
    def hook(module: nn.Module, inputs: object, output: torch.Tensor) -> None:
        if not captured:
            captured.append(output)

    return hook


def reference_maps(
    feat_fn: Callable[[torch.Tensor], torch.Tensor],
    stop_module: nn.Module | None,
    image: torch.Tensor,
    seeds: list[tuple[int, int, int, float]],
) -> torch.Tensor:
    """One autograd pass per seed (image index, y, x, value) -> (R, h, w) channel-summed probabilities.

    `feat_fn` maps the normalised image batch to the last conv map; `stop_module` is the module whose
    first output is the stop tensor (None = the normalised image itself).
    """
    maps = []
    for b, y, x, value in seeds:
        captured: list[torch.Tensor] = []
        handle = None
        if stop_module is not None:
            handle = stop_module.register_forward_hook(first_output_into(captured))
        inp = image[b : b + 1].clone().requires_grad_()
        with excitation_rules():
            feat = feat_fn(inp)
        if handle is not None:
            handle.remove()
        target = captured[0] if stop_module is not None else inp
        seed = torch.zeros_like(feat)
        column = feat[0, :, y, x].clamp(min=0).detach()
        seed[0, :, y, x] = value * column / column.sum()
        (p,) = torch.autograd.grad(feat, target, seed)
        maps.append(p[0].sum(0))
    return torch.stack(maps)
