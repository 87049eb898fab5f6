"""DASR region extraction: cost against the forward pass, speed-up over one autograd pass per peak,
and localisation on composite-dev, per stop stride and shape estimation.

    python bench/dasr.py --data ../shared/data/composite-dev --models bench/out/models

Exports efficientnet_lite0 (real weights) and resnet50 (random init) with every stop stride into
--models when they are not there. Prints three markdown tables (medians over images, one run).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from inserve.engines import EngineOptions
from inserve.server.config import DasrConfig
from inserve.server.evaluation import Dataset
from inserve.server.imaging import ImageConfig, decode_image, prepare
from inserve.server.models import ModelBundle, locate_manifest
from inserve.server.stages.dasr import PEAK_FINDERS, dasr_regions, regions_from_maps, seed_maps
from inserve.server.stages.nms import box_iou
from inserve.server.stages.peaks import mean_activation

STRIDES = (1, 2, 4, 8, 16)


def seeds_per_run(stride: int) -> int:
    """Seeds per engine run: a seed's tensors grow as 1/stride^2, so fewer per run at fine strides (memory)."""
    return min(48, 6 * stride)


def ensure_models(models: Path, backbone: str, random_init: bool) -> Path:
    try:
        return locate_manifest(models, backbone)
    except RuntimeError:
        from inserve.export.onnx_export import ExportOptions, export_backbone

        print(f"exporting {backbone} to {models} ...", file=sys.stderr)
        options = ExportOptions(dasr_strides=STRIDES, check=False)
        return export_backbone(backbone, models, random_init=random_init, options=options)


def median_ms(samples: list[float]) -> float:
    return 1000 * statistics.median(samples)


def timed(fn: Callable[..., object], *args: object, repeat: int = 1) -> float:
    """Seconds of the fastest of `repeat` calls (warm the engine up before the first image)."""
    best = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn(*args)
        best.append(time.perf_counter() - start)
    return min(best)


def extract(engine: object, stride: int, pixels: np.ndarray, feat: np.ndarray, config: DasrConfig) -> list:
    """DASR* regions of one unpadded image, as the pipeline extracts them."""
    return dasr_regions(engine, stride, pixels, [feat[0]], [pixels.shape[2:]], "dasr_star", config)


def load_inputs(dataset: Dataset, names: list[str], multiple: int) -> list:
    config = ImageConfig()
    return [prepare(decode_image(dataset.path(n).read_bytes(), config), config.long_side, multiple) for n in names]


def cost_table(bundle: ModelBundle, inputs: list, strides: list[int], threads: int) -> list[dict]:
    """Part 1: forward time, DASR* extraction time, ratio, peaks and time per peak, per stop stride."""
    rows = []
    for stride in strides:
        engine = bundle.backprop(stride)
        config = DasrConfig(stop_stride=stride, seeds_per_run=seeds_per_run(stride))
        warm = inputs[0].pixels[None]
        extract(engine, stride, warm, bundle.features(warm)["feat"], config)
        forward, extraction, peaks = [], [], []
        for inp in inputs:
            pixels = inp.pixels[None]
            forward.append(timed(bundle.features, pixels, repeat=2))
            feat = bundle.features(pixels)["feat"]
            peaks.append(len(PEAK_FINDERS["dasr_star"](mean_activation(feat[0]))))
            extraction.append(timed(extract, engine, stride, pixels, feat, config))
        per_peak = [1000 * e / p for e, p in zip(extraction, peaks)]
        rows.append(
            {
                "stride": stride,
                "forward_ms": median_ms(forward),
                "dasr_star_ms": median_ms(extraction),
                "ratio": statistics.median(e / f for e, f in zip(extraction, forward)),
                "peaks": statistics.median(peaks),
                "ms_per_peak": statistics.median(per_peak),
            }
        )
    return rows


def official_table(manifests: dict[str, Path], inputs: list, stride: int, peaks_cap: int) -> list[dict]:
    """Part 2: the same peaks, eager torch, batch 1, one autograd backward per peak (as the official DASR
    code does) against the exported graph in ONNX Runtime."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from excitation_reference import folded_copy, with_eltwise_sums

    from inserve.export.backbones import load_backbone
    from inserve.export.graphs import BackboneGraph

    rows = []
    for name, manifest in manifests.items():
        bundle = ModelBundle(manifest, EngineOptions(device="cpu"))
        loaded = load_backbone(name, random_init=name != "efficientnet_lite0")
        program = loaded.spec.program(loaded.model, loaded.spec.default_desc)
        normalize = BackboneGraph(loaded, program).normalize
        model = with_eltwise_sums(folded_copy(loaded.model))
        feat_fn, stop = reference_parts(name, model, stride)
        engine = bundle.backprop(stride)
        ours, theirs, counts = [], [], []
        for inp in inputs:
            pixels = inp.pixels[None]
            feat = bundle.features(pixels)["feat"]
            seeds = PEAK_FINDERS["dasr_star"](mean_activation(feat[0]))[:peaks_cap]
            counts.append(len(seeds))
            yx, value = seeds[None].astype(np.int64), np.ones((1, len(seeds)), dtype=np.float32)
            ours.append(timed(engine.run, {"image": pixels, "seed_yx": yx, "seed_value": value}))
            x = normalize(torch.from_numpy(pixels))
            theirs.append(timed(one_backward_per_peak, feat_fn, stop, x, seeds))
        rows.append(
            {
                "backbone": name,
                "stride": stride,
                "peaks": statistics.median(counts),
                "graph_ms": median_ms(ours),
                "autograd_ms": median_ms(theirs),
                "speedup": statistics.median(t / o for t, o in zip(theirs, ours)),
            }
        )
    return rows


def one_backward_per_peak(feat_fn: Callable, stop: object, x: object, seeds: np.ndarray) -> None:
    """The official DASR way: one forward with excitation rules, then one autograd backward per peak."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from excitation_reference import excitation_rules, first_output_into

    captured: list = []
    x = x.clone().requires_grad_()
    hook = stop.register_forward_hook(first_output_into(captured)) if stop is not None else None
    with excitation_rules():
        f = feat_fn(x)
    if hook is None:
        captured.append(x)
    else:
        hook.remove()
    for y, xx in seeds:
        seed = torch.zeros_like(f)
        column = f[0, :, y, xx].clamp(min=0).detach()
        seed[0, :, y, xx] = column / column.sum()
        torch.autograd.grad(f, captured[0], seed, retain_graph=True)


def reference_parts(name: str, model: object, stride: int) -> tuple[Callable, object | None]:
    """The feat function and the module whose output is the stop stride's map (None: the input)."""
    if name == "resnet50":
        m = model

        def feat_fn(x: object) -> object:
            return m.layer4(m.layer3(m.layer2(m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(x))))))))

        stops = {1: None, 2: model.relu, 4: model.maxpool, 8: model.layer2[0], 16: model.layer3[0]}
        return feat_fn, stops[stride]
    stops = {1: None, 2: model._swish, 4: model._blocks[1], 8: model._blocks[3], 16: model._blocks[5]}
    return model.extract_features, stops[stride]


def localisation_table(
    bundle: ModelBundle, dataset: Dataset, names: list[str], inputs: list, strides: list[int]
) -> list[dict]:
    """Part 3: fraction of ground-truth boxes covered by an extracted region with IoU >= 0.5, regions per image."""
    truth = {}
    for q in dataset.queries:
        truth.update(q.boxes)
    shapes = ("moments", "official")
    rows = []
    feats = [bundle.features(inp.pixels[None])["feat"] for inp in inputs]
    for peaks in ("dasr", "dasr_star"):
        for stride in strides:
            engine = bundle.backprop(stride)
            configs = {shape: replace(DasrConfig(), stop_stride=stride, shape=shape) for shape in shapes}
            covered, regions = dict.fromkeys(shapes, 0), {shape: [] for shape in shapes}
            counted = 0
            for name, inp, feat in zip(names, inputs, feats):
                (activation,), (positions,), (maps,) = seed_maps(
                    engine, inp.pixels[None], [feat[0]], peaks, seeds_per_run(stride)
                )
                counted += name in truth
                for shape, config in configs.items():
                    found = regions_from_maps(activation, positions, maps, inp.pixels.shape[1:], stride, peaks, config)
                    boxes = inp.to_original(found.boxes)
                    regions[shape].append(len(boxes))
                    if name in truth and len(boxes):
                        covered[shape] += box_iou(boxes, np.array(truth[name])).max() >= 0.5
            for shape in shapes:
                row = {"peaks": peaks, "stride": stride, "shape": shape, "loc_iou50": covered[shape] / max(counted, 1)}
                rows.append(row | {"regions": float(np.mean(regions[shape])), "images": counted})
    return rows


def markdown(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        lines.append("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row.values()) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/composite-dev"))
    parser.add_argument("--models", type=Path, default=Path("bench/out/models"))
    parser.add_argument("--images", type=int, default=40, help="images for the cost and localisation tables")
    parser.add_argument("--official-images", type=int, default=3, help="images for the autograd comparison")
    parser.add_argument("--official-stride", type=int, default=8)
    parser.add_argument("--peaks-cap", type=int, default=48, help="peaks per image in the autograd comparison")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--parts", default="1,2,3")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()

    dataset = Dataset.load(args.data)
    names = [n for n in dataset.images if n.endswith(("_1.jpg", "_2.jpg", "_3.jpg"))][: args.images]
    manifests = {
        "efficientnet_lite0": ensure_models(args.models, "efficientnet_lite0", False),
        "resnet50": ensure_models(args.models, "resnet50", True),
    }
    options = EngineOptions(device="cpu", intra_op_threads=args.threads)
    bundle = ModelBundle(manifests["efficientnet_lite0"], options)
    inputs = load_inputs(dataset, names, bundle.size_multiple)
    parts = set(args.parts.split(","))
    out = {}
    if "1" in parts:
        out["cost"] = cost_table(bundle, inputs, [1, 4, 8, 16], args.threads)
        print("## 1. DASR* cost per image (efficientnet_lite0, ONNX Runtime CPU)\n\n" + markdown(out["cost"]) + "\n")
    if "2" in parts:
        sample = inputs[: args.official_images]
        out["official"] = official_table(manifests, sample, args.official_stride, args.peaks_cap)
        print(
            "## 2. Exported graph vs one autograd pass per peak (batch 1, eager torch)\n\n"
            + markdown(out["official"])
            + "\n"
        )
    if "3" in parts:
        out["localisation"] = localisation_table(bundle, dataset, names, inputs, [1, 4, 8, 16])
        print("## 3. Localisation on composite-dev\n\n" + markdown(out["localisation"]) + "\n")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
