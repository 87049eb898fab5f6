"""The official DASR code's region extraction, re-implemented from its description: an honest eager baseline.

The official implementation (github.com/wlzhao22/DASR, PyTorch 2.0, a fork of the PRM code of Zhou et al.) is
read, not copied; this file follows the procedure it implements, in our own code:

1. Network: a ResNet-50 cut after `layer4` (stride 32); the activation map is the mean over channels, kept in the
   autograd graph (model.py). Batch 1 only.
2. Excitation rule: only `nn.Conv2d` modules are changed, by replacing each one's `forward` (MethodType). The new
   forward returns the true response (detached) but routes the gradient through Z = conv(A - min(A), relu(W)):
   dA = (A - min A) * conv_transpose(g / |Z|, relu(W)), zero where Z < 1e-10 (peak_backprop.py). min(A) is one
   scalar per tensor, so signed inputs (the normalised image, BatchNorm outputs) are shifted to be >= 0. Every other
   layer keeps its ordinary gradient: BatchNorm (scaled by gamma / sigma), ReLU (masked), max pooling (to the
   argmax), the residual `+=` (copied to both branches), the channel mean (1/C per channel).
3. Peaks (peak_stimulation.py): 3x3 local maxima of the mean map (-inf padding, a cell is a peak when the 3x3 max
   pool's argmax is itself, so ties go to the first cell in raster order), minus those on the map's border rows
   and columns. The official `use_DASR*` branch keeps every such peak; its plain DASR branch keeps only those
   >= the map's mean. Either way only peaks with value > 0 are back-propagated.
4. One forward (with `input.requires_grad_()`), then per peak one `backward(retain_graph=True)` of the whole graph
   from a one-hot seed on the mean map down to the input pixels (stride 1), `input.grad` zeroed before each. The
   model's parameters keep `requires_grad`, so BatchNorm weight grads are computed and accumulated too.
5. Map: input.grad summed over the colour channels, clamped at 0; pixels below its 95th percentile (over all
   pixels, zeros included) set to 0; the support is what stays non-zero.
6. Box (util.py estimate_ellipse): unweighted mean and covariance of the support's (row, col); ellipse axes
   2 sqrt(eigenvalue), orientation 0.5 atan2(2 c_rc, c_cc - c_rr); half-sides of its bounding rectangle;
   box = int(mean) -/+ int(half-side), clipped to [0, side - 1] (inclusive pixel indices).
7. `use_DASR*`: greedy NMS (py-faster-rcnn style: +1 areas, a box survives while IoU <= 0.3), scores = peak values.
   Plain DASR: no box NMS.

`official_dasr_star` runs this on one normalised image; `official_dasr` is the plain-DASR branch. Both also accept
a `stop` module (the official code always stops at the input) and the paper's DASR* seeds (every cell above the map
mean, `seeds="above_mean"`, which the official code does not implement), for like-for-like timings.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import MethodType

import numpy as np
import torch
from torch import nn
from torch.autograd import Function
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from excitation_reference import first_output_into  # tests/ holds the shared autograd helpers

EPS = 1e-10  # |Z| below this gives no gradient (the official PostHook's epsilon)
SEED_RULES = ("official", "above_mean")


class _ShiftedInput(Function):
    """Identity forward; backward multiplies the gradient by (A - offset): the A of A * F+ in Eq. 3."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, offset)
        return a.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        a, offset = ctx.saved_tensors
        return grad * (a - offset), None


class _ThroughNormaliser(Function):
    """Forward: the layer's true response. Backward: the gradient goes to Z (not to the response), divided by |Z|."""

    @staticmethod
    def forward(ctx, response: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(z)
        return response.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[None, torch.Tensor]:
        (z,) = ctx.saved_tensors
        return None, torch.where(z < EPS, torch.zeros_like(grad), grad / (z.abs() + EPS))


def _identity(a: torch.Tensor) -> torch.Tensor:
    return a


def _excitation_conv_forward(self: nn.Conv2d, a: torch.Tensor) -> torch.Tensor:
    """A Conv2d's forward with the official excitation rule. TF-style 'same' convolutions (efficientnet_lite_pytorch's
    Conv2dStaticSamePadding) pad with their own module first; the padding is zero in the shifted domain, as the
    plain Conv2d's built-in padding is."""
    pad = getattr(self, "static_padding", None) or _identity
    offset = a.min().detach()
    a = _ShiftedInput.apply(a, offset)
    args = (self.stride, self.padding, self.dilation, self.groups)
    response = F.conv2d(pad(a), self.weight, self.bias, *args).detach()
    z = F.conv2d(pad(a - offset), self.weight.detach().clamp(min=0), None, *args)
    return _ThroughNormaliser.apply(response, z)


@contextlib.contextmanager
def official_rules(model: nn.Module) -> Iterator[None]:
    """Every Conv2d of `model` with the official rule (its `forward` replaced), restored on exit."""
    patched = []
    for module in model.modules():
        if not isinstance(module, nn.Conv2d):
            continue
        if module.padding_mode != "zeros" or "DynamicSamePadding" in type(module).__name__:
            raise NotImplementedError(f"{type(module).__name__} with padding_mode={module.padding_mode!r}")
        if "forward" in vars(module):
            raise RuntimeError(f"{type(module).__name__} already has its forward replaced")
        module.forward = MethodType(_excitation_conv_forward, module)
        patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward


def official_peaks(activation: torch.Tensor, above_mean: bool) -> tuple[np.ndarray, np.ndarray]:
    """Peaks of the mean map (h, w) the official way: (n, 2) (y, x) in raster order, and their values.

    A 3x3 local maximum is a cell that the 3x3 max pool (stride 1, -inf padding) picks as its own window's argmax;
    cells on the border rows and columns are dropped; `above_mean` keeps only peaks >= the map's mean."""
    h, w = activation.shape
    a = activation.detach().reshape(1, 1, h, w)
    padded = F.pad(a, (1, 1, 1, 1), value=float("-inf"))
    pooled, argmax = F.max_pool2d(padded, 3, stride=1, return_indices=True)
    own = torch.arange((h + 2) * (w + 2), device=a.device).reshape(1, 1, h + 2, w + 2)[:, :, 1:-1, 1:-1]
    is_peak = argmax == own
    if above_mean:
        is_peak &= a >= a.mean()
    is_peak[..., 0, :] = False
    is_peak[..., -1, :] = False
    is_peak[..., :, 0] = False
    is_peak[..., :, -1] = False
    yx = torch.nonzero(is_peak[0, 0])
    return yx.cpu().numpy().astype(np.int64), pooled[0, 0][is_peak[0, 0]].cpu().numpy()


def above_mean_seeds(activation: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The paper's DASR* seeds (seed 004 III-B, as server/stages/peaks.py `above_mean`): every cell > the mean."""
    a = activation.detach()
    yx = torch.nonzero(a > a.mean())
    return yx.cpu().numpy().astype(np.int64), a[a > a.mean()].cpu().numpy()


def official_support(prm: np.ndarray, percentile: float = 95.0) -> np.ndarray:
    """Mask of the activated pixels: the clamped map with values below its `percentile`-th percentile zeroed,
    what stays non-zero."""
    prm = np.clip(prm, 0, None)
    return (prm >= np.percentile(prm, percentile)) & (prm > 0)


def official_ellipse_box(mask: np.ndarray) -> np.ndarray | None:
    """(x1, y1, x2, y2), inclusive indices of the mask's grid: bounding rectangle of the 2-sigma ellipse of the
    support's unweighted second moments, built from the eigen-decomposition and truncated as the official code
    does. None for an empty support (where the official code would fail on NaN)."""
    rows, cols = np.nonzero(mask)
    if len(rows) == 0:
        return None
    points = np.stack([rows, cols], axis=1).astype(np.float64)
    mu = points.mean(axis=0)
    centred = points - mu
    cov = centred.T @ centred / len(points)
    minor, major = 2.0 * np.sqrt(np.clip(np.linalg.eigvalsh(cov), 0.0, None))  # ascending
    angle = 0.5 * math.atan2(cov[1, 0] + cov[0, 1], cov[1, 1] - cov[0, 0])  # major axis, from the column axis
    ux, uy = major * math.cos(angle), major * math.sin(angle)
    vx, vy = minor * math.cos(angle + math.pi / 2), minor * math.sin(angle + math.pi / 2)
    half_w, half_h = math.hypot(ux, vx), math.hypot(uy, vy)
    h, w = mask.shape
    y1, y2 = np.clip(np.array([-int(half_h), int(half_h)]) + int(mu[0]), 0, h - 1)
    x1, x2 = np.clip(np.array([-int(half_w), int(half_w)]) + int(mu[1]), 0, w - 1)
    return np.array([x1, y1, x2, y2], dtype=np.float64)


def official_nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Greedy NMS on inclusive pixel boxes (areas with +1), best score first; a box is dropped when its IoU with
    the one kept exceeds `iou`. Indices kept, in the order kept."""
    x1, y1, x2, y2 = (boxes[:, i] for i in range(4))
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(scores)[::-1]
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(int(i))
        iw = np.maximum(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1, 0)
        ih = np.maximum(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1, 0)
        inter = iw * ih
        order = rest[inter / (areas[i] + areas[rest] - inter) <= iou]
    return np.asarray(keep, dtype=np.int64)


def official_regions(
    model: nn.Module,
    stop: nn.Module | None,
    feat_fn: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    *,
    star: bool = True,
    seeds: str = "official",
    nms_iou: float = 0.3,
    percentile: float = 95.0,
    max_peaks: int | None = None,
) -> tuple[np.ndarray, dict]:
    """The official procedure on ONE normalised image (1, 3, H, W), eager torch (CPU or wherever `model` is).

    `feat_fn(x)` is the last conv map (1, C, h, w) of `model` (the official: ResNet-50's layer4 output); `stop` the
    module whose first output is where back-propagation ends (None: the input pixels, as the official code does).
    `star`: the official `use_DASR*` branch (every border-free local maximum, box NMS at `nms_iou`); otherwise its
    plain DASR branch (local maxima >= the mean, no box NMS). `seeds="above_mean"` replaces the peaks by every cell
    above the map's mean (the paper's DASR*, the project's `dasr_star` seeds). `max_peaks` caps the back-propagated
    peaks (the first ones in the official raster order), for short timing runs.

    Returns boxes (N, 4) float32 (x1, y1, x2, y2) in input pixels, x2/y2 the last pixel inside (add 1 for the
    project's half-open boxes), in NMS order (best first) for `star`, in peak order otherwise; and timings:
    forward_s (the patched forward, which computes two convolutions per conv), peaks_s, backward_s (all backward
    passes, map read-out included), boxes_s (threshold, ellipse, NMS), total_s, peaks (back-propagated),
    backward_per_peak_s, regions, empty (maps with no support).
    """
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError("the official procedure runs one image at a time: (1, 3, H, W)")
    if seeds not in SEED_RULES:
        raise ValueError(f"unknown seeds {seeds!r}; choose one of {SEED_RULES}")
    start = time.perf_counter()
    x = image.detach().clone().requires_grad_()
    captured: list[torch.Tensor] = []
    handle = stop.register_forward_hook(first_output_into(captured)) if stop is not None else None
    try:
        with official_rules(model):
            activation = feat_fn(x).mean(dim=1, keepdim=True)
    finally:
        if handle is not None:
            handle.remove()
    target = captured[0] if stop is not None else x
    forward_s = time.perf_counter() - start

    t = time.perf_counter()
    if seeds == "official":
        positions, values = official_peaks(activation[0, 0], above_mean=not star)
    else:
        positions, values = above_mean_seeds(activation[0, 0])
    chosen = values > 0
    positions, values = positions[chosen][:max_peaks], values[chosen][:max_peaks]
    peaks_s = time.perf_counter() - t

    t = time.perf_counter()
    maps = []
    seed = torch.zeros_like(activation)
    for y, xx in positions:
        seed.zero_()
        seed[0, 0, y, xx] = 1.0
        if stop is None:  # as the official code: a full backward into input.grad (and the parameters' grads)
            if x.grad is not None:
                x.grad.zero_()
            activation.backward(seed, retain_graph=True)
            grad = x.grad
        else:  # only down to the stop tensor
            (grad,) = torch.autograd.grad(activation, target, seed, retain_graph=True)
        maps.append(grad.detach()[0].sum(0).clamp(min=0).cpu().numpy())
    backward_s = time.perf_counter() - t

    t = time.perf_counter()
    stride_y, stride_x = x.shape[2] / target.shape[2], x.shape[3] / target.shape[3]
    boxes, scores, empty = [], [], 0
    for prm, value in zip(maps, values):
        box = official_ellipse_box(official_support(prm, percentile))
        if box is None:
            empty += 1
            continue
        # cells of the stop map -> the input pixels they cover (identity at stride 1)
        boxes.append([box[0] * stride_x, box[1] * stride_y, (box[2] + 1) * stride_x - 1, (box[3] + 1) * stride_y - 1])
        scores.append(float(value))
    out = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    if star and len(out):
        out = out[official_nms(out.astype(np.float64), np.asarray(scores), nms_iou)]
    boxes_s = time.perf_counter() - t

    timings = {
        "forward_s": forward_s,
        "peaks_s": peaks_s,
        "backward_s": backward_s,
        "boxes_s": boxes_s,
        "total_s": time.perf_counter() - start,
        "peaks": len(positions),
        "backward_per_peak_s": backward_s / max(len(positions), 1),
        "regions": len(out),
        "empty": empty,
    }
    return out, timings


def official_dasr_star(
    model: nn.Module,
    stop: nn.Module | None,
    feat_fn: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    nms_iou: float = 0.3,
    **options: object,
) -> tuple[np.ndarray, dict]:
    """The official `use_DASR*` branch: `official_regions(..., star=True)`."""
    return official_regions(model, stop, feat_fn, image, star=True, nms_iou=nms_iou, **options)


def official_dasr(
    model: nn.Module,
    stop: nn.Module | None,
    feat_fn: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    **options: object,
) -> tuple[np.ndarray, dict]:
    """The official plain DASR branch: `official_regions(..., star=False)`."""
    return official_regions(model, stop, feat_fn, image, star=False, **options)


def resnet_features(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """conv1 .. layer4 of a torchvision ResNet (the official `features_dasr`)."""
    m = model

    def feat_fn(x: torch.Tensor) -> torch.Tensor:
        return m.layer4(m.layer3(m.layer2(m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(x))))))))

    return feat_fn


def load_image(path: str, long_side: int = 512, multiple: int = 32) -> torch.Tensor:
    """An image file -> (1, 3, H, W) normalised with the ImageNet mean and std (the official `ImageNet` transform),
    long side `long_side`, both sides rounded to a multiple of `multiple` (the official code does not round)."""
    from PIL import Image

    image = Image.open(path).convert("RGB")
    scale = long_side / max(image.size)
    size = tuple(max(multiple, multiple * round(s * scale / multiple)) for s in image.size)
    pixels = np.asarray(image.resize(size, Image.BICUBIC), dtype=np.float32) / 255.0
    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
    return torch.from_numpy(((pixels - mean) / std).transpose(2, 0, 1).copy())[None]


if __name__ == "__main__":
    import statistics
    import sys

    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet50(weights=None).eval()
    paths = sys.argv[1:]
    images = [load_image(p) for p in paths] if paths else [torch.randn(1, 3, 224, 320)]
    official_dasr_star(net, None, resnet_features(net), torch.randn(1, 3, 96, 96))  # warm-up: first calls are slow
    rows = []
    for name, img in zip(paths or ["random 224x320"], images):
        found, timing = official_dasr_star(net, None, resnet_features(net), img)
        rows.append(timing)
        print(
            f"{name} {tuple(img.shape[2:])}: {timing['peaks']} peaks -> {len(found)} boxes, "
            f"forward {timing['forward_s']:.2f} s, backward {timing['backward_s']:.2f} s "
            f"({timing['backward_per_peak_s']:.2f} s/peak), total {timing['total_s']:.2f} s"
        )
    if len(rows) > 1:
        print(
            f"median: {statistics.median(r['total_s'] for r in rows):.2f} s/image, "
            f"{statistics.median(r['backward_per_peak_s'] for r in rows):.2f} s/peak (backward)"
        )
