"""DASR on a CUDA GPU: the exported top-down and adjoint graphs against the official procedure, on one device.

    python bench/dasr_gpu.py --data ../shared/data/composite-dev --images 20

Runs the torch modules that `inserve export` writes to ONNX (BackboneGraph, DasrBackprop, DasrMoments) in
eager CUDA, so it measures the graphs' maths on a GPU without TensorRT or onnxruntime-gpu; the official
procedure (bench/dasr_official.py: eager torch, batch 1, its own peaks, one autograd backward per peak down to
the input) runs on the same device. Also checks the CUDA maps and moments against the CPU
ones. Prints markdown tables of medians over images.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dasr import load_inputs, markdown, official_feat_fn
from dasr_official import official_dasr_star

from inserve.export.backbones import load_backbone
from inserve.export.graphs import BackboneGraph, DasrBackprop, DasrMoments
from inserve.server.evaluation import Dataset
from inserve.server.stages.peaks import above_mean, mean_activation
from inserve.server.stages.shapes import moment_functionals


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def cuda_ms(fn: Callable[[], object], repeat: int = 3) -> float:
    """Fastest of `repeat` synchronised calls, after one warm-up, in milliseconds."""
    fn()
    synchronize()
    best = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        synchronize()
        best.append(time.perf_counter() - start)
    return 1000 * min(best)


def seeds_of(feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DASR* seeds of a batch of one: every location above the mean activation."""
    positions = above_mean(mean_activation(feat[0].float().cpu().numpy()))
    yx = torch.from_numpy(positions[None].astype(np.int64)).to(feat.device)
    return yx, torch.ones(1, len(positions), device=feat.device)


def backbone_rows(name: str, pixels: list[np.ndarray], strides: list[int], batch: int) -> list[dict]:
    loaded = load_backbone(name, random_init=name != "efficientnet_lite0")
    program = loaded.spec.program(loaded.model, loaded.spec.default_desc)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    graph = BackboneGraph(loaded, program).to(device).eval()
    model = loaded.model.to(device).eval()
    rows = []
    with torch.no_grad():
        images = [torch.from_numpy(p[None]).to(device) for p in pixels]
        forward = [cuda_ms(partial(graph, x)) for x in images]
        seeds = [seeds_of(graph(x)[0]) for x in images]
    for stride in strides:
        dasr = DasrBackprop(loaded, program, stride).to(device).eval()
        with torch.no_grad():
            ours = [cuda_ms(partial(dasr, x, *s)) for x, s in zip(images, seeds)]
            stacked = torch.cat(images[:batch])
            width = max(s[0].shape[1] for s in seeds[:batch])
            yx = torch.zeros(len(stacked), width, 2, dtype=torch.int64, device=device)
            value = torch.zeros(len(stacked), width, device=device)
            for b, (s_yx, s_value) in enumerate(seeds[:batch]):
                yx[b, : s_yx.shape[1]], value[b, : s_value.shape[1]] = s_yx[0], s_value[0]
            batched = cuda_ms(partial(dasr, stacked, yx, value)) / len(stacked)
            gpu_maps = dasr(images[0], *seeds[0]).cpu()
            cpu = DasrBackprop(loaded, program, stride).eval()
            cpu_maps = cpu(images[0].cpu(), seeds[0][0].cpu(), seeds[0][1].cpu())
            error = float((gpu_maps - cpu_maps).abs().max() / cpu_maps.abs().max())
            moments = DasrMoments(loaded, program, stride).to(device).eval()
            cells = (images[0].shape[2] // stride, images[0].shape[3] // stride)
            functionals = torch.from_numpy(moment_functionals(cells, cells))[None].to(device)
            adjoint = [cuda_ms(partial(moments, x, functionals)) for x in images]
            batched_adjoint = cuda_ms(partial(moments, stacked, functionals.expand(len(stacked), -1, -1, -1)))
            cpu_moments = DasrMoments(loaded, program, stride).eval()(images[0].cpu(), functionals.cpu())[-1]
            moments_error = float(
                (moments(images[0], functionals)[-1].cpu() - cpu_moments).abs().max() / cpu_moments.abs().max()
            )
        theirs = [
            cuda_ms(partial(official_dasr_star, model, None, official_feat_fn(name, model), graph.normalize(x)), 1)
            for x in images
        ]
        peaks = [s[0].shape[1] for s in seeds]
        rows.append(
            {
                "backbone": name,
                "stride": stride,
                "peaks": statistics.median(peaks),
                "forward_ms": statistics.median(forward),
                "graph_ms": statistics.median(ours),
                "graph_ratio": statistics.median(o / f for o, f in zip(ours, forward)),
                f"graph_ms_b{batch}": batched,
                "adjoint_ms": statistics.median(adjoint),
                "adjoint_ratio": statistics.median(a / f for a, f in zip(adjoint, forward)),
                f"adjoint_ms_b{batch}": batched_adjoint / len(stacked),
                "official_ms": statistics.median(theirs),
                "official / adjoint": statistics.median(t / a for t, a in zip(theirs, adjoint)),
                "cuda_vs_cpu": max(error, moments_error),
            }
        )
        print(markdown(rows[-1:]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/composite-dev"))
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8, help="images per run for the batched column")
    parser.add_argument("--strides", default="8,16")
    parser.add_argument("--backbones", default="efficientnet_lite0,resnet50")
    args = parser.parse_args()
    dataset = Dataset.load(args.data)
    names = [n for n in dataset.images if n.endswith(("_1.jpg", "_2.jpg", "_3.jpg"))][: args.images]
    pixels = [inp.pixels for inp in load_inputs(dataset, names, 32)]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (no CUDA device)"
    print(f"# {device}, torch {torch.__version__}, {len(pixels)} images")
    rows = []
    for name in args.backbones.split(","):
        rows += backbone_rows(name, pixels, [int(s) for s in args.strides.split(",")], args.batch)
    print("\n" + markdown(rows))


if __name__ == "__main__":
    main()
