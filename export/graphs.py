"""The torch modules that become ONNX graphs: backbone, CAM head and DASR top-down pass.

All take RGB pixels in 0..255 (normalisation is inside the graph) with height and width
multiples of the program's `size_multiple`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from inserve.export.backbones import LoadedBackbone
from inserve.export.programs import ACTIVATIONS, Act, Add, Conv, Op, Pool, Program, apply_forward


class _Normalize(nn.Module):
    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).reshape(1, 3, 1, 1))
        self.register_buffer("inv_std", 1.0 / torch.tensor(std, dtype=torch.float32).reshape(1, 3, 1, 1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return (image - self.mean) * self.inv_std


class _ProgramForward(nn.Module):
    """Runs a program's ops with their (BatchNorm-folded) weights held as buffers."""

    def __init__(self, program: Program) -> None:
        super().__init__()
        self.program = program
        for i, op in enumerate(program.ops):
            if isinstance(op, Conv):
                self.register_buffer(f"w{i}", op.weight)
                self.register_buffer(f"b{i}", op.bias)

    def _op(self, i: int, op: Op) -> Op:
        if isinstance(op, Conv):  # use the buffers so that .to(device) moves the weights
            return Conv(op.src, op.dst, getattr(self, f"w{i}"), getattr(self, f"b{i}"), op.stride, op.pads, op.groups)
        return op

    def run(self, x: torch.Tensor, keep: set[str]) -> dict[str, torch.Tensor]:
        values = {"image": x}
        kept = {name: x for name in keep if name == "image"}
        for i, op in enumerate(self.program.ops):
            values[op.dst] = apply_forward(self._op(i, op), values)
            if op.dst in keep:
                kept[op.dst] = values[op.dst]
        return kept


class ClassifierHead(nn.Module):
    """Logits from `feat`, and the per-class channel weights that turn `feat` into CAMs.

    `gap_linear` (ResNet, EfficientNet): logits = W mean(feat) + b, and class k's channel weights are
    W[k] (the CAM of Zhou et al.). `vgg`: pool5 -> adaptive 7x7 average -> fc6/fc7/fc8, and the channel
    weights are Grad-CAM's: the spatial mean of d logit_k / d feat, written out in closed form.
    """

    def __init__(self, loaded: LoadedBackbone) -> None:
        super().__init__()
        self.kind = loaded.spec.head
        model = loaded.model
        if self.kind == "gap_linear":
            fc = model._fc if hasattr(model, "_fc") else model.fc
            self.weights = nn.ParameterList([fc.weight, fc.bias])
        else:
            fc6, fc7, fc8 = (m for m in model.classifier if isinstance(m, nn.Linear))
            self.weights = nn.ParameterList([fc6.weight, fc6.bias, fc7.weight, fc7.bias, fc8.weight, fc8.bias])
        self.weights.requires_grad_(False)

    def _vgg_hidden(self, feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        w6, b6, w7, b7, _, _ = self.weights
        pooled = adaptive_avg_pool(F.max_pool2d(feat, 2, 2), 7).flatten(1)
        h6 = F.linear(pooled, w6, b6)
        h7 = F.linear(F.relu(h6), w7, b7)
        return pooled, h6, h7

    def logits(self, feat: torch.Tensor) -> torch.Tensor:
        if self.kind == "gap_linear":
            return F.linear(feat.mean((2, 3)), self.weights[0], self.weights[1])
        _, _, h7 = self._vgg_hidden(feat)
        return F.linear(F.relu(h7), self.weights[4], self.weights[5])

    def channel_weights(self, feat: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """(B, N, C) weights of each feat channel for the classes (B, N)."""
        if self.kind == "gap_linear":
            return self.weights[0][classes]
        w6, _, w7, _, w8, _ = self.weights
        _, h6, h7 = self._vgg_hidden(feat)
        g7 = w8[classes] * (h7 > 0).unsqueeze(1).to(feat.dtype)  # (B, N, 4096)
        g6 = (g7 @ w7) * (h6 > 0).unsqueeze(1).to(feat.dtype)
        g_pooled = g6 @ w6  # (B, N, C*49)
        # pool5's and the adaptive pool's gradients keep their sums, so the spatial mean is the 7x7 sum / (h w)
        size = feat.shape[2] * feat.shape[3]
        return g_pooled.reshape(*classes.shape, feat.shape[1], 49).sum(-1) / size


def adaptive_avg_pool(x: torch.Tensor, out: int) -> torch.Tensor:
    """torch's adaptive average pooling as two matrix products, exportable for any input size."""

    def matrix(n: int) -> torch.Tensor:
        i = torch.arange(out, device=x.device).unsqueeze(1)
        j = torch.arange(n, device=x.device).unsqueeze(0)
        start = torch.div(i * n, out, rounding_mode="floor")
        end = torch.div((i + 1) * n + out - 1, out, rounding_mode="floor")
        mask = ((j >= start) & (j < end)).to(x.dtype)
        return mask / mask.sum(1, keepdim=True)

    rows, cols = matrix(x.shape[2]), matrix(x.shape[3])
    return torch.einsum("ih,bchw,jw->bcij", rows, x, cols)


class BackboneGraph(nn.Module):
    """image (B,3,H,W) 0..255 -> feat (last conv map), desc (descriptor map), logits."""

    def __init__(self, loaded: LoadedBackbone, program: Program) -> None:
        super().__init__()
        self.normalize = _Normalize(loaded.spec.mean, loaded.spec.std)
        self.body = _ProgramForward(program)
        self.head = ClassifierHead(loaded)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        program = self.body.program
        maps = self.body.run(self.normalize(image), {program.feat, program.desc})
        feat = maps[program.feat]
        return feat, maps[program.desc], self.head.logits(feat)


class CamHead(nn.Module):
    """feat, logits -> the top-N classes, their softmax scores and their class activation maps."""

    def __init__(self, loaded: LoadedBackbone, top_n: int) -> None:
        super().__init__()
        self.head = ClassifierHead(loaded)
        self.top_n = top_n

    def forward(self, feat: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scores, classes = torch.topk(torch.softmax(logits, dim=1), self.top_n, dim=1)
        weights = self.head.channel_weights(feat, classes)
        cams = torch.einsum("bnc,bchw->bnhw", weights, feat)
        return classes, scores, cams


def adjoint_weight(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """Weights of the convolution that computes a stride-1 convolution's transpose: channels swapped
    within each group, kernel flipped."""
    c_out, c_in_g, k_h, k_w = weight.shape
    w = weight.reshape(groups, c_out // groups, c_in_g, k_h, k_w).transpose(1, 2)
    return w.reshape(groups * c_in_g, c_out // groups, k_h, k_w).flip(2, 3).contiguous()


def _adjoint(
    s: torch.Tensor, weight: torch.Tensor, adjoint: torch.Tensor | None, op: Conv | Pool, groups: int
) -> torch.Tensor:
    """Transpose of `conv2d(pad(x, op.pads), weight, stride)` applied to `s`, at x's size.

    Stride 1 runs as a plain convolution with the adjoint weights (much faster than ConvTranspose in
    every runtime); stride 2 as a transposed convolution cropped to the input, exact for the even
    input sizes every stride-2 layer sees here (up to `rem` trailing rows no window reached).
    """
    left, right, top, bottom = op.pads
    k_h, k_w = weight.shape[2], weight.shape[3]
    if op.stride == 1:
        pads = (k_w - 1 - left, k_w - 1 - right, k_h - 1 - top, k_h - 1 - bottom)
        if len(set(pads)) == 1:
            return F.conv2d(s, adjoint, padding=pads[0], groups=groups)
        return F.conv2d(F.pad(s, pads), adjoint, groups=groups)
    rem_h = (top + bottom - k_h) % op.stride
    rem_w = (left + right - k_w) % op.stride
    full = F.conv_transpose2d(s, weight, stride=op.stride, groups=groups)
    return F.pad(full, (-left, rem_w - right, -top, rem_h - bottom))


def _conv(x: torch.Tensor, weight: torch.Tensor, op: Conv | Pool, groups: int) -> torch.Tensor:
    left, right, top, bottom = op.pads
    if left == right == top == bottom:
        return F.conv2d(x, weight, stride=op.stride, padding=left, groups=groups)
    return F.conv2d(F.pad(x, op.pads), weight, stride=op.stride, groups=groups)


def _per_seed(p: torch.Tensor, per_image: torch.Tensor) -> torch.Tensor:
    """p (B*S, C or 1, ...) times per_image (B, C, ...), broadcast over each image's S seeds (and over channels
    where p has one) without copying."""
    batch = per_image.shape[0]
    return (p.reshape(batch, -1, *p.shape[1:]) * per_image.unsqueeze(1)).flatten(0, 1)


class _TopDown(nn.Module):
    """What the DASR graphs share: the forward pass, the layers above the stop tensor and, per layer, the
    positive (and, for signed inputs, negative) weight terms of the excitation rule with their normaliser."""

    def __init__(self, loaded: LoadedBackbone, program: Program, stop_stride: int, adjoint_weights: bool) -> None:
        super().__init__()
        if stop_stride not in program.stage_points:
            raise ValueError(f"stop stride {stop_stride} not in {sorted(program.stage_points)}")
        self.normalize = _Normalize(loaded.spec.mean, loaded.spec.std)
        self.body = _ProgramForward(program)
        self.stop = program.stage_points[stop_stride]
        first = program.op_index(self.stop) + 1
        last = program.op_index(program.feat)
        self.steps = list(range(first, last + 1))
        for i in self.steps:
            op = program.ops[i]
            if isinstance(op, Conv):
                self._register_terms(i, op.weight.clamp(min=0), op.groups, "pos", adjoint_weights)
                if op.src in program.signed:
                    self._register_terms(i, op.weight.clamp(max=0), op.groups, "neg", adjoint_weights)
            elif isinstance(op, Pool):
                if op.src in program.signed:
                    raise ValueError(f"pooling {op.dst!r} of a signed input has no excitation rule here")
                channels = program.channels(op.src)
                ones = torch.ones(channels, 1, op.kernel, op.kernel)
                self._register_terms(i, ones, channels, "pos", adjoint_weights)
            elif not (isinstance(op, Add) or (isinstance(op, Act) and op.kind in ACTIVATIONS)):
                raise ValueError(f"layer {op.dst!r} ({op}) has no excitation rule; DASR cannot pass through it")

    def _register_terms(self, i: int, weight: torch.Tensor, groups: int, sign: str, adjoint: bool) -> None:
        self.register_buffer(f"{sign}{i}", weight)
        if adjoint:
            self.register_buffer(f"{sign}{i}_adjoint", adjoint_weight(weight, groups))

    def _activations(self, image: torch.Tensor, also: frozenset[str] = frozenset()) -> dict[str, torch.Tensor]:
        """The forward maps the top-down rules read (the inputs of every layer above the stop, `feat`), and `also`."""
        ops = self.body.program.ops
        names = {self.body.program.feat, *also}
        for i in self.steps:
            op = ops[i]
            if isinstance(op, Conv | Pool):
                names.add(op.src)
            elif isinstance(op, Add):
                names.update((op.src, op.other))
        return self.body.run(self.normalize(image), names)

    def _terms(
        self, i: int, op: Conv | Pool, a: torch.Tensor
    ) -> tuple[int, list[tuple[torch.Tensor, str]], torch.Tensor]:
        """groups, [(input part, weight sign)], and Z, all per image.

        Z = conv(A+, F+) + conv(A-, F-) depends only on the image: it is computed once per image and
        broadcast over that image's seeds (or functionals). Inputs after a ReLU are their own positive part."""
        groups = op.groups if isinstance(op, Conv) else a.shape[1]
        signed = hasattr(self, f"neg{i}")
        terms = [(a.clamp(min=0), "pos"), (a.clamp(max=0), "neg")] if signed else [(a, "pos")]
        return groups, terms, self._through(i, op, [x for x, _ in terms], groups)

    def _through(self, i: int, op: Conv | Pool, parts: list[torch.Tensor], groups: int) -> torch.Tensor:
        """sum_t conv(parts[t], F_t) over the layer's weight terms (positive, then negative): one convolution over
        the parts concatenated where DasrMoments registered both terms as one weight."""
        if hasattr(self, f"both{i}"):
            return _conv(torch.cat(parts, 1), getattr(self, f"both{i}"), op, 1)
        signs = ("pos", "neg")[: len(parts)]
        return sum(_conv(x, getattr(self, f"{sign}{i}"), op, groups) for x, sign in zip(parts, signs))

    def _excite(self, i: int, op: Conv | Pool, a: torch.Tensor, p_out: torch.Tensor) -> torch.Tensor:
        """P(input) = A * conv_transpose(P(output) / Z, F); `a` is per image, `p_out` per seed (or one per image)."""
        groups, terms, z = self._terms(i, op, a)
        s = _per_seed(p_out, torch.where(z > 0, 1.0 / z.clamp(min=1e-30), torch.zeros_like(z)))
        return sum(
            _per_seed(_adjoint(s, getattr(self, f"{sign}{i}"), getattr(self, f"{sign}{i}_adjoint"), op, groups), x)
            for x, sign in terms
        )

    def _push_down(
        self, probs: dict[str, torch.Tensor], acts: dict[str, torch.Tensor], steps: list[int]
    ) -> dict[str, torch.Tensor]:
        """`probs` (per seed, or one per image) back-propagated down `steps`, from the last: what reaches the
        tensors those ops read from below them."""
        program = self.body.program
        for i in reversed(steps):
            op = program.ops[i]
            p_out = probs.pop(op.dst)
            if isinstance(op, Conv | Pool):
                _accumulate(probs, op.src, self._excite(i, op, acts[op.src], p_out))
            elif isinstance(op, Add):
                for name, share in zip((op.src, op.other), _positive_shares(acts[op.src], acts[op.other])):
                    _accumulate(probs, name, _per_seed(p_out, share))
            else:
                _accumulate(probs, op.src, p_out)
        return probs


class DasrBackprop(_TopDown):
    """Excitation back-propagation (seed 004, Eqs. 1-3) of a batch of peak seeds to `stop_stride`.

    Inputs: image (B,3,H,W) 0..255; seed_yx (B,S,2) int64, S seed positions on `feat` per image;
    seed_value (B,S) the probability mass each seed starts with (0 = an unused slot). Output: maps
    (B, S, H/s, W/s), each seed's probability summed over the channels of the stage at stride s.
    Every seed of every image is one row (b*S + s) of every per-seed tensor.

    Rules, layer by layer from `feat` down:
    - convolution (BatchNorm folded): P(A|B) proportional to the positive part of each input's
      contribution (A*F)+. For non-negative A (after every ReLU) this is Eq. 3 exactly, A*F+; for
      signed A (the normalised image, EfficientNet's linear bottlenecks) negative inputs pass
      through negative weights, so no evidence is dropped and no probability turns negative;
    - max / average pooling: an all-ones filter on one-to-one channel pairs (seed 004, III-A);
    - residual sum: split in proportion to each branch's positive part;
    - ReLU / ReLU6: passed through.
    """

    def __init__(self, loaded: LoadedBackbone, program: Program, stop_stride: int) -> None:
        super().__init__(loaded, program, stop_stride, adjoint_weights=True)

    @staticmethod
    def _seed_mass(feat: torch.Tensor, seed_yx: torch.Tensor, seed_value: torch.Tensor) -> torch.Tensor:
        """P at `feat` (B*S, C, h, w): the seed's position, spread over channels like its activation."""
        h, w = feat.shape[2], feat.shape[3]
        rows = torch.arange(h, device=feat.device).reshape(1, 1, h, 1) == seed_yx[..., 0:1].unsqueeze(-1)
        cols = torch.arange(w, device=feat.device).reshape(1, 1, 1, w) == seed_yx[..., 1:2].unsqueeze(-1)
        at_seed = feat.clamp(min=0).unsqueeze(1) * (rows & cols).unsqueeze(2).to(feat.dtype)  # (B,S,C,h,w)
        total = at_seed.sum((2, 3, 4), keepdim=True)
        value = seed_value.reshape(*seed_value.shape, 1, 1, 1)
        scale = torch.where(total > 0, value / total.clamp(min=1e-30), torch.zeros_like(total))
        return (at_seed * scale).flatten(0, 1)

    def forward(self, image: torch.Tensor, seed_yx: torch.Tensor, seed_value: torch.Tensor) -> torch.Tensor:
        program = self.body.program
        acts = self._activations(image)
        seeds = {program.feat: self._seed_mass(acts[program.feat], seed_yx, seed_value)}
        maps = self._push_down(seeds, acts, self.steps)[self.stop].sum(1)
        return maps.reshape(seed_value.shape[0], seed_value.shape[1], maps.shape[1], maps.shape[2])


@dataclass
class _Pulled:
    """The functionals pulled up to one tensor: g_k = rows[k] * factor. `factor` (B, C, h, w) is per image and not
    yet applied (None: 1). `spatial`: g is the same in every channel, rows[k] is (B, 1, h, w)."""

    rows: list[torch.Tensor]
    factor: torch.Tensor | None
    spatial: bool = False

    def channel_rows(self, channels: int) -> list[torch.Tensor]:
        """rows (B, channels, h, w): a spatial row enters as a convolution's channel broadcast, which ONNX Runtime
        keeps in its blocked layout (DasrMoments, Layout)."""
        if not self.spatial:
            return self.rows
        ones = torch.ones(channels, 1, 1, 1, dtype=self.rows[0].dtype, device=self.rows[0].device)
        return [F.conv2d(r, ones) for r in self.rows]


class DasrMoments(_TopDown):
    """The adjoint of DasrBackprop: linear functionals of the map of *every* `feat` cell as a seed, at once.

    Inputs: image (B,3,H,W) 0..255; functionals (B,K,H/s,W/s), K weightings of the stop map's cells.
    Outputs: feat, desc, logits as BackboneGraph gives them, from the same forward pass (so that indexing runs
    the network once, not once for the maps and again for the moments); moments (B,K,h,w) with
    moments[b,k,y,x] = sum_p functionals[b,k,p] * map(p), where map is DasrBackprop's map of a unit seed at
    (y, x) of image b. With the functionals 1, x, y, x^2, y^2 these are the mass, centroid and variances of
    every possible seed's map (server/stages/shapes.py).

    Why: the top-down pass is linear in the seed once the forward pass is fixed, P_stop = M P_feat, so a
    functional g of the map is g^T M P_feat = (M^T g)^T P_feat. M^T is a product of per-layer transposes,
    run from the stop tensor up, in the forward direction; each is exact (no layer is approximated):
    - convolution or pooling (P_in = A * conv_transpose(P_out / Z, F)): g_out = conv(A * g_in, F) / Z, with the
      same strides, groups and paddings as the forward layer, for the positive and (signed inputs) negative
      terms; the stride-2 layers' cropped transposed convolution is the exact transpose of that padded conv;
    - residual sum (P_a = share_a P_out, P_b = share_b P_out): g_out = share_a g_a + share_b g_b;
    - ReLU / ReLU6 (P passed through): g passed through;
    - channel sum at the stop tensor: g broadcast over its channels;
    - the seed (a unit mass at a cell, spread over channels as its activation f+ / sum f+): the channel sum of
      g_feat * f+ / sum f+ (0 where the cell has no positive activation, as the seed then has no mass).
    Layers without such a rule (squeeze-excitation, other activations) are refused at construction.
    Cost: K forward-direction passes over the layers above the stop, whatever the number of seeds.

    Seed side: where the top of the network acts on each cell alone (`seed_side`: 1x1 stride-1 convolutions,
    activations, residual sums, e.g. lite0's last projection and head), the seed is pushed down instead, once
    per image for every cell at once: the map of a seed at a cell stays at that cell there, so one tensor holds
    them all. The functionals stop at the `frontier` tensors where the two sides meet, and a moment is the
    channel sum of g * P over the frontier (g^T M_low M_top seed = (M_low^T g)^T (M_top seed)): exact, and one
    pass in place of K through those layers.

    Channel-constant start: at the stop g is one map broadcast over the channels, and a 1x1 convolution keeps it
    so (conv(A * phi * m, F) = phi * conv(A * m, F) when phi does not depend on the channel), so up to the first
    wider kernel only a per-image factor is pulled up (`_pull_through`), not K functionals: e.g. lite0's first
    expansion above the stop, resnet50's first 1x1 convolution (and its downsampling, at stride 4).

    Layout: each functional is a tensor of its own (B, C, h, w), not a row of a (B*K, ...) batch, so that every
    product with a per-image factor is of two tensors of one shape. ONNX Runtime's CPU layout transformer keeps
    only such products in its blocked (NCHWc) layout; broadcasting the factor over the K rows of a batch sent
    every functional out of that layout and back at every layer, about a fifth of the graph's time. For the
    same reason the functionals enter as channel-broadcast copies made by a convolution, and every per-image
    factor passes through `_blocked`. The exported graph therefore fixes K (len(MOMENTS)).
    """

    def __init__(self, loaded: LoadedBackbone, program: Program, stop_stride: int) -> None:
        super().__init__(loaded, program, stop_stride, adjoint_weights=False)
        self.head = ClassifierHead(loaded)
        self.seed_side, self.frontier = seed_side(program, self.steps)
        for i in self.steps:
            signs = [sign for sign in ("pos", "neg") if hasattr(self, f"{sign}{i}")]
            if i in self.seed_side:  # the seed is pushed down these: the transposed weights
                for sign in signs:
                    weight = getattr(self, f"{sign}{i}")
                    self.register_buffer(f"{sign}{i}_adjoint", adjoint_weight(weight, program.ops[i].groups))
            elif len(signs) == 2 and program.ops[i].groups == 1:  # both signed terms as one convolution
                self.register_buffer(f"both{i}", torch.cat([getattr(self, f"pos{i}"), getattr(self, f"neg{i}")], 1))

    def forward(
        self, image: torch.Tensor, functionals: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each tensor's g is a `_Pulled`: the 1 / Z of a layer is folded into the next per-image product (its
        consumer's A, a residual share, the seed spread), so a functional pays one multiplication per layer, not
        two; and while g is the same in every channel, only its per-image factor is pulled up."""
        program = self.body.program
        acts = self._activations(image, frozenset({program.desc}))
        g = {self.stop: _Pulled([f.unsqueeze(1) for f in functionals.unbind(1)], None, spatial=True)}
        for i in self.steps:
            op = program.ops[i]
            if i in self.seed_side:
                continue
            if isinstance(op, Conv | Pool):
                g[op.dst] = self._pull_through(i, op, acts[op.src], g[op.src], program.channels(op.src))
            elif isinstance(op, Add):
                shares = _positive_shares(acts[op.src], acts[op.other])
                a, b = g[op.src], g[op.other]
                if a.spatial and b.spatial and a.rows is b.rows:
                    g[op.dst] = _Pulled(
                        a.rows, _scaled(shares[0], a.factor) + _scaled(shares[1], b.factor), spatial=True
                    )
                    continue
                channels = program.channels(op.dst)
                a_rows, b_rows = a.channel_rows(channels), b.channel_rows(channels)
                fa, fb = _blocked(_scaled(shares[0], a.factor)), _blocked(_scaled(shares[1], b.factor))
                g[op.dst] = _Pulled([ra * fa + rb * fb for ra, rb in zip(a_rows, b_rows)], None)
            else:
                g[op.dst] = g[op.src]
        mass = self._frontier_mass(acts)
        moments = []
        for name in self.frontier:
            pulled = g[name]
            factor = _scaled(mass[name], pulled.factor)
            if pulled.spatial:
                moments.append(torch.cat(pulled.rows, 1) * factor.sum(1, keepdim=True))
            else:
                factor = _blocked(factor)
                moments.append(torch.stack([(r * factor).sum(1) for r in pulled.rows], 1))
        feat = acts[program.feat]
        return feat, acts[program.desc], self.head.logits(feat), sum(moments)

    def _pull_through(self, i: int, op: Conv | Pool, a: torch.Tensor, pulled: _Pulled, channels: int) -> _Pulled:
        """g at a convolution's (or pooling's) output: conv(A * g, F) / Z, the 1 / Z left pending.

        Where g is the same in every channel and the kernel is 1x1, conv(A * g, F) = g * conv(A * factor, F) (g
        read at the strided cells): one convolution per image, not one per functional; with no factor yet (at the
        stop) that convolution is Z itself, so g * Z / Z is g where Z > 0."""
        groups, terms, z = self._terms(i, op, a)
        if pulled.spatial and _one_by_one(op):
            rows = [r[:, :, :: op.stride, :: op.stride] for r in pulled.rows] if op.stride > 1 else pulled.rows
            if pulled.factor is None:
                return _Pulled(rows, (z > 0).to(z.dtype), spatial=True)
            through = self._through(i, op, [x * pulled.factor for x, _ in terms], groups)
            return _Pulled(rows, through * (1.0 / z.clamp(min=_TINY)), spatial=True)
        factors = [_blocked(_scaled(x, pulled.factor)) for x, _ in terms]
        out = [self._through(i, op, [r * f for f in factors], groups) for r in pulled.channel_rows(channels)]
        # where Z = 0 every product A * F+ of the window is 0, so `out` is exactly 0 there: no mask needed
        return _Pulled(out, 1.0 / z.clamp(min=_TINY))

    def _frontier_mass(self, acts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per frontier tensor, (B, C, h, w): the mass a unit seed at each cell of `feat` leaves there, down the
        seed side (DasrBackprop's rules, with every cell's seed in one tensor: they do not meet)."""
        feat = self.body.program.feat
        positive = acts[feat].clamp(min=0)
        total = positive.sum(1, keepdim=True)
        spread = positive * torch.where(total > 0, 1.0 / total.clamp(min=1e-30), torch.zeros_like(total))
        return self._push_down({feat: spread}, acts, self.seed_side)


def seed_side(program: Program, steps: list[int]) -> tuple[list[int], list[str]]:
    """The ops (ascending) through which a seed's map stays at its own cell, from `feat` down: 1x1 stride-1
    unpadded convolutions, activations and residual sums whose outputs flow only into such ops (or are
    `feat`); and the frontier, the other tensors they read (DasrMoments, Seed side)."""
    ops = program.ops
    consumers: dict[str, list[int]] = {}
    for i in steps:
        for name in _inputs(ops[i]):
            consumers.setdefault(name, []).append(i)
    side: set[int] = set()
    for i in reversed(steps):
        op = ops[i]
        users = consumers.get(op.dst, [])
        flows = op.dst == program.feat or (bool(users) and all(c in side for c in users))
        pointwise = isinstance(op, Add | Act) or (_one_by_one(op) and op.stride == 1)
        if flows and pointwise:
            side.add(i)
    if not side:
        return [], [program.feat]
    seed_tensors = {ops[i].dst for i in side}
    frontier = [n for i in sorted(side) for n in _inputs(ops[i]) if n not in seed_tensors]
    return sorted(side), list(dict.fromkeys(frontier))


def _one_by_one(op: Op) -> bool:
    """A convolution whose every output reads one input cell."""
    return isinstance(op, Conv) and op.weight.shape[2:] == (1, 1) and not any(op.pads)


def _inputs(op: Op) -> tuple[str, ...]:
    return (op.src, op.other) if isinstance(op, Add) else (op.src,)


def _blocked(per_image: torch.Tensor) -> torch.Tensor:
    """`per_image` through an identity depthwise 1x1 convolution: exact (x * 1), and in ONNX Runtime's blocked
    layout, which its layout transformer gives only to convolution outputs and a few ops (not Reciprocal, Where,
    Min, Max). A per-image factor is K times smaller than the functionals it multiplies, so converting it costs
    little next to converting them (DasrMoments, Layout)."""
    channels = per_image.shape[1]
    ones = torch.ones(channels, 1, 1, 1, dtype=per_image.dtype, device=per_image.device)
    return F.conv2d(per_image, ones, groups=channels)


# Z below this is taken as this: 1 / Z then stays far from float32's range even times large activations, and no
# Z of a real network is this small without being 0 (where the pulled-up value is 0 anyway)
_TINY = 1e-20


def _scaled(per_image: torch.Tensor, pending: torch.Tensor | None) -> torch.Tensor:
    return per_image if pending is None else per_image * pending


def _positive_shares(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each summand's share of a residual sum, in proportion to its positive part (0 where both are <= 0)."""
    a, b = a.clamp(min=0), b.clamp(min=0)
    inv_total = torch.where(a + b > 0, 1.0 / (a + b).clamp(min=1e-30), torch.zeros_like(a))
    return a * inv_total, b * inv_total


def _accumulate(probs: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
    probs[name] = probs[name] + value if name in probs else value
