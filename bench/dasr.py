"""DASR* region extraction: cost of each region mode against the forward pass, against the official procedure,
how well its boxes cover composite-dev's instances, and the region stage's peak memory.

    python bench/dasr.py --data ../shared/data/composite-dev --models bench/out/models

Exports efficientnet_lite0 (real weights) and resnet50 (RANDOM INIT) with DASR graphs at stop strides 8 and 16
into --models when they are not there. Prints four markdown tables (medians over images, one run):

1. cost: backbone forward, then DASR* regions from its `feat` to boxes in each mode (`exact`, `adjoint`,
   `hybrid`), per backbone and stop stride; ratios to the forward pass measured side by side;
2. the official procedure (bench/dasr_official.py: eager torch, batch 1, one autograd backward per peak, down to
   the input) on the same images, against the three modes;
3. boxes: share of composite-dev's ground-truth boxes that some region covers at IoU >= 0.5, the mean best IoU,
   and regions per image, for every mode, DASR* seed choice and adjoint multiplier `sigmas`;
4. peak memory of the region stage at batch 8 (a fresh process per mode; VmHWM growth over the backbone's);
5. indexing cost per image: the pipeline describing an image with gem, dasr_star_crops and whole_and_regions,
   side by side.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from inserve.engines import EngineOptions
from inserve.server.config import REGION_MODES, DasrConfig, ServerConfig
from inserve.server.evaluation import Dataset
from inserve.server.imaging import ImageConfig, decode_image, prepare
from inserve.server.models import ModelBundle, locate_manifest
from inserve.server.stages.dasr import (
    STAR_SEEDS,
    DasrEngines,
    backpropagate_seeds,
    batch_functionals,
    dasr_region_sets,
    dasr_regions,
    find_seeds,
    regions_from_maps,
    regions_from_moments,
    seed_moments,
)
from inserve.server.stages.nms import box_iou
from inserve.server.stages.peaks import mean_activation

STRIDES = (8, 16)
SIGMAS = (1.0, 1.25, 1.5, 1.75, 2.0)


def ensure_models(models: Path, backbone: str, random_init: bool) -> Path:
    try:
        manifest = locate_manifest(models, backbone)
        ModelBundle(manifest, verify=False).moments(STRIDES[0])
        return manifest
    except RuntimeError:  # ModelsError: none there, or exported by older code
        pass
    from inserve.export.onnx_export import ExportOptions, export_backbone

    print(f"exporting {backbone} to {models} ...", file=sys.stderr)
    options = ExportOptions(dasr_strides=STRIDES, check=False)
    return export_backbone(backbone, models, random_init=random_init, options=options)


def median_ms(samples: list[float]) -> float:
    return 1000 * statistics.median(samples)


def timed(fn: Callable[..., object], *args: object, repeat: int = 1) -> float:
    """Seconds of the fastest of `repeat` calls."""
    best = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn(*args)
        best.append(time.perf_counter() - start)
    return min(best)


def engines(bundle: ModelBundle, stride: int) -> DasrEngines:
    return DasrEngines(bundle.backprop(stride), bundle.moments(stride))


def extract(bundle: ModelBundle, stride: int, pixels: np.ndarray, feat: np.ndarray, config: DasrConfig) -> list:
    """DASR* regions of one unpadded image from the backbone's `feat` (the adjoint recomputes the forward pass)."""
    return dasr_regions(engines(bundle, stride), stride, pixels, [feat[0]], [pixels.shape[2:]], "dasr_star", config)


def extract_with_backbone(bundle: ModelBundle, stride: int, pixels: np.ndarray, config: DasrConfig) -> list:
    """The backbone's maps and the adjoint DASR* regions of one unpadded image from one run of the moments graph,
    as indexing runs them (Pipeline.features with moments)."""
    sizes = [pixels.shape[2:]]
    maps = bundle.features_and_moments(pixels, stride, batch_functionals(pixels, sizes, stride))
    found = dasr_region_sets(
        engines(bundle, stride), stride, pixels, [maps["feat"][0]], sizes, ("dasr_star",), config, [maps["moments"][0]]
    )
    return found["dasr_star"]


def load_inputs(dataset: Dataset, names: list[str], multiple: int) -> list:
    config = ImageConfig()
    return [prepare(decode_image(dataset.path(n).read_bytes(), config), config.long_side, multiple) for n in names]


WITH_BACKBONE = "adjoint, with the backbone"


def cost_table(bundles: dict[str, ModelBundle], inputs: list, images: dict[str, int]) -> list[dict]:
    """Part 1: per backbone, stride and mode: forward ms, region ms (feat -> boxes), their ratio, and
    (forward + regions) / forward; the modes of one image run back to back, so the ratios are side by side.
    `adjoint, with the backbone` is what indexing runs: the backbone's maps and the moments from one run of the
    moments graph; its region ms are that run's (and the boxes') time less the forward pass's."""
    rows = []
    for name, bundle in bundles.items():
        sample = inputs[: images[name]]
        for stride in bundle.stop_strides:
            configs = {mode: DasrConfig(stop_stride=stride, mode=mode) for mode in REGION_MODES}
            warm = sample[0].pixels[None]
            for config in configs.values():
                extract(bundle, stride, warm, bundle.features(warm)["feat"], config)
            extract_with_backbone(bundle, stride, warm, configs["adjoint"])
            forward, seeds, spent = [], [], {mode: [] for mode in (*REGION_MODES, WITH_BACKBONE)}
            for inp in sample:
                pixels = inp.pixels[None]
                forward.append(timed(bundle.features, pixels, repeat=2))
                feat = bundle.features(pixels)["feat"]
                seeds.append(len(find_seeds("dasr_star", mean_activation(feat[0]), configs["exact"])))
                for mode, config in configs.items():
                    spent[mode].append(timed(extract, bundle, stride, pixels, feat, config))
                both = timed(extract_with_backbone, bundle, stride, pixels, configs["adjoint"], repeat=2)
                spent[WITH_BACKBONE].append(both - forward[-1])
            for mode in spent:
                rows.append(
                    {
                        "backbone": name,
                        "stride": stride,
                        "mode": mode,
                        "images": len(sample),
                        "seeds": statistics.median(seeds),
                        "forward_ms": median_ms(forward),
                        "regions_ms": median_ms(spent[mode]),
                        "regions/forward": statistics.median(s / f for s, f in zip(spent[mode], forward)),
                        "(forward+regions)/forward": statistics.median(1 + s / f for s, f in zip(spent[mode], forward)),
                    }
                )
    return rows


def official_table(bundles: dict[str, ModelBundle], inputs: list, stride: int, peaks_cap: int) -> list[dict]:
    """Part 2: the official procedure (stop at the input, its own peaks: border-free 3x3 local maxima) and the same
    with the paper's DASR* seeds (every cell above the mean, the first `peaks_cap`), against ours at `stride`."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from dasr_official import official_dasr_star

    from inserve.export.backbones import load_backbone
    from inserve.export.graphs import BackboneGraph

    rows = []
    for name, bundle in bundles.items():
        loaded = load_backbone(name, random_init=name != "efficientnet_lite0")
        program = loaded.spec.program(loaded.model, loaded.spec.default_desc)
        normalize = BackboneGraph(loaded, program).normalize
        model = loaded.model.eval()
        feat_fn = official_feat_fn(name, model)
        official_dasr_star(model, None, feat_fn, normalize(torch.from_numpy(inputs[0].pixels[None][:, :, :96, :96])))
        measured: dict[str, list[float]] = {}
        peaks: dict[str, list[int]] = {}
        for inp in inputs:
            pixels = inp.pixels[None]
            x = normalize(torch.from_numpy(pixels))
            for label, seeds in (("official, its peaks", "official"), ("official, DASR* seeds", "above_mean")):
                _, t = official_dasr_star(model, None, feat_fn, x, seeds=seeds, max_peaks=peaks_cap)
                measured.setdefault(label, []).append(t["total_s"])
                peaks.setdefault(label, []).append(t["peaks"])
            feat = bundle.features(pixels)["feat"]
            start = time.perf_counter()
            bundle.features(pixels)
            forward = time.perf_counter() - start
            count = len(find_seeds("dasr_star", mean_activation(feat[0]), DasrConfig()))
            for mode in REGION_MODES:
                label = f"inserve {mode}, DASR* seeds, stride {stride}"
                config = DasrConfig(stop_stride=stride, mode=mode)
                measured.setdefault(label, []).append(forward + timed(extract, bundle, stride, pixels, feat, config))
                peaks.setdefault(label, []).append(count)
        ours = measured[f"inserve adjoint, DASR* seeds, stride {stride}"]
        for label, seconds in measured.items():
            rows.append(
                {
                    "backbone": name,
                    "procedure": label,
                    "peaks": statistics.median(peaks[label]),
                    "ms per image": median_ms(seconds),
                    "ms per peak": statistics.median(1000 * s / max(p, 1) for s, p in zip(seconds, peaks[label])),
                    "adjoint speed-up": statistics.median(s / o for s, o in zip(seconds, ours)),
                }
            )
    return rows


def official_feat_fn(name: str, model: object) -> Callable:
    """The last conv map of the unfolded torch model, as the official code computes it (ResNet: layer4)."""
    if name == "resnet50":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from dasr_official import resnet_features

        return resnet_features(model)
    return model.extract_features


def boxes_table(bundle: ModelBundle, dataset: Dataset, names: list[str], inputs: list, stride: int) -> list[dict]:
    """Part 3: coverage of the ground-truth boxes (best region IoU >= 0.5), mean best IoU, regions per image."""
    truth = {}
    for q in dataset.queries:
        truth.update(q.boxes)
    variants = [("exact", "above_mean", None), ("hybrid", "above_mean", 1.5)]
    variants += [("adjoint", seeds, sigmas) for seeds in STAR_SEEDS for sigmas in SIGMAS]
    best: dict[tuple, list[float]] = {v: [] for v in variants}
    counts: dict[tuple, list[int]] = {v: [] for v in variants}
    base = DasrConfig(stop_stride=stride)
    eng = engines(bundle, stride)
    for name, inp in zip(names, inputs):
        pixels = inp.pixels[None]
        feat = bundle.features(pixels)["feat"][0]
        activation = mean_activation(feat)
        (moments,) = seed_moments(eng.moments, stride, pixels, [feat], [pixels.shape[2:]])
        for variant in variants:
            mode, seeds, sigmas = variant
            config = replace(base, mode=mode, star_seeds=seeds, sigmas=sigmas or base.sigmas)
            positions = find_seeds("dasr_star", activation, config)
            size = inp.pixels.shape[1:]
            if mode == "adjoint":
                found, _ = regions_from_moments(activation, positions, moments, size, stride, "dasr_star", config)
            elif mode == "exact":
                (maps,) = backpropagate_seeds(eng.backprop, pixels, [positions], config.seeds_per_run)
                found = regions_from_maps(activation, positions, maps, size, stride, "dasr_star", config)
            else:
                (found,) = dasr_regions(eng, stride, pixels, [feat], [pixels.shape[2:]], "dasr_star", config)
            boxes = inp.to_original(found.boxes)
            counts[variant].append(len(boxes))
            if name in truth:
                best[variant].append(float(box_iou(boxes, np.array(truth[name])).max()) if len(boxes) else 0.0)
    return [
        {
            "mode": mode,
            "seeds": seeds,
            "sigmas": "" if sigmas is None else sigmas,
            "loc IoU>=0.5": float(np.mean(np.array(best[(mode, seeds, sigmas)]) >= 0.5)),
            "mean best IoU": float(np.mean(best[(mode, seeds, sigmas)])),
            "regions / image": float(np.mean(counts[(mode, seeds, sigmas)])),
            "boxes": len(best[(mode, seeds, sigmas)]),
        }
        for mode, seeds, sigmas in variants
    ]


MEMORY_CHILD = """
import json, resource, sys
import numpy as np
from inserve.engines import EngineOptions
from inserve.server.config import REGION_MODES, DasrConfig
from inserve.server.models import ModelBundle
from inserve.server.stages.dasr import DasrEngines, dasr_regions

manifest, mode, seeds, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

def hwm():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 1024

bundle = ModelBundle(__import__("pathlib").Path(manifest), EngineOptions(device="cpu"))
stride = bundle.default_stop_stride
rng = np.random.default_rng(0)
pixels = rng.uniform(0, 255, (8, 3, size, size)).astype(np.float32)
feat = list(bundle.features(pixels)["feat"])
before = hwm()
config = DasrConfig(mode=mode, star_seeds=seeds)
engines = DasrEngines(bundle.backprop(stride), bundle.moments(stride))
regions = dasr_regions(engines, stride, pixels, feat, [(size, size)] * 8, "dasr_star", config)
print(json.dumps({"backbone_mib": before, "after_mib": hwm()}))
"""


def memory_table(manifest: Path, size: int) -> list[dict]:
    """Part 4: VmHWM of a fresh process after the backbone at batch 8, and after the region stage."""
    rows = []
    for mode, seeds in [*((m, "above_mean") for m in REGION_MODES), ("adjoint", "all")]:
        out = subprocess.run(
            [sys.executable, "-c", MEMORY_CHILD, str(manifest), mode, seeds, str(size)],
            check=True,
            capture_output=True,
            text=True,
        )
        got = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(
            {
                "mode": mode,
                "seeds": seeds,
                "batch": 8,
                "input": f"{size}x{size}",
                "after backbone MiB": got["backbone_mib"],
                "after regions MiB": got["after_mib"],
                "region stage MiB": got["after_mib"] - got["backbone_mib"],
            }
        )
    return rows


def indexing_table(bundle: ModelBundle, inputs: list, modes: tuple[str, ...], batches: tuple[int, ...]) -> list[dict]:
    """Part 5: describing images for the index (the pipeline's whole work but the write), gem against
    dasr_star_crops in each region mode and the default whole_and_regions, one image at a time and in batches
    as the server's batcher forms them (`batches`: sizes; images of one shape bucket per batch); the recipes
    take turns on every batch."""
    from inserve.server.pipeline import DescribeJob, Pipeline
    from inserve.server.recipes import build_recipes

    pipelines = {("gem", ""): Pipeline(bundle, build_recipes(("gem",), ServerConfig()), ImageConfig())}
    for mode in modes:
        config = ServerConfig(dasr=DasrConfig(mode=mode))
        pipelines[("dasr_star_crops", mode)] = Pipeline(
            bundle, build_recipes(("dasr_star_crops",), config), ImageConfig(), dasr=config.dasr
        )
    served = ServerConfig()  # the default recipe as served: its regions, crops and photo vector
    pipelines[("whole_and_regions", served.dasr.mode)] = Pipeline(
        bundle, build_recipes(("whole_and_regions",), served), ImageConfig(), dasr=served.dasr
    )
    for pipeline in pipelines.values():
        pipeline.run([DescribeJob(inputs[0])])
    by_bucket: dict[tuple, list] = {}
    for inp in inputs:
        by_bucket.setdefault(pipelines[("gem", "")].bucket(inp), []).append(inp)
    rows = []
    for size in batches:
        groups = [group[i : i + size] for group in by_bucket.values() for i in range(0, len(group), size)]
        spent: dict[tuple[str, str], list[float]] = {key: [] for key in pipelines}
        for group in groups:
            for key, pipeline in pipelines.items():
                spent[key].append(timed(pipeline.run, [DescribeJob(inp) for inp in group]) / len(group))
        gem = spent[("gem", "")]
        rows += [
            {
                "recipe": recipe,
                "mode": mode,
                "batch": size,
                "ms per image": median_ms(seconds),
                "ratio to gem": statistics.median(s / g for s, g in zip(seconds, gem)),
            }
            for (recipe, mode), seconds in spent.items()
        ]
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
    parser.add_argument("--images", type=int, default=12, help="images for the cost table (efficientnet_lite0)")
    parser.add_argument("--index-images", type=int, default=24, help="images for the indexing table (part 5)")
    parser.add_argument("--resnet-images", type=int, default=3, help="images for the cost table (resnet50)")
    parser.add_argument("--box-images", type=int, default=375, help="images for the boxes table")
    parser.add_argument("--official-images", type=int, default=2, help="images for the official comparison")
    parser.add_argument("--peaks-cap", type=int, default=8, help="peaks per image in the official comparison")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--parts", default="1,2,3,4,5")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()

    dataset = Dataset.load(args.data)
    positives = [n for n in dataset.images if n.endswith(("_1.jpg", "_2.jpg", "_3.jpg"))]
    manifests = {
        "efficientnet_lite0": ensure_models(args.models, "efficientnet_lite0", False),
        "resnet50": ensure_models(args.models, "resnet50", True),
    }
    options = EngineOptions(device="cpu", intra_op_threads=args.threads)
    bundles = {name: ModelBundle(manifest, options) for name, manifest in manifests.items()}
    lite0 = bundles["efficientnet_lite0"]
    count = max(args.images, args.resnet_images, args.official_images)
    inputs = load_inputs(dataset, positives[:count], lite0.size_multiple)
    parts = set(args.parts.split(","))
    out = {}
    if "1" in parts:
        images = {"efficientnet_lite0": args.images, "resnet50": args.resnet_images}
        out["cost"] = cost_table(bundles, inputs, images)
        print("## 1. DASR* cost per image (ONNX Runtime CPU)\n\n" + markdown(out["cost"]) + "\n", flush=True)
    if "2" in parts:
        stride = lite0.default_stop_stride
        out["official"] = official_table(bundles, inputs[: args.official_images], stride, args.peaks_cap)
        print("## 2. Against the official procedure\n\n" + markdown(out["official"]) + "\n", flush=True)
    if "3" in parts:
        names = positives[: args.box_images]
        box_inputs = load_inputs(dataset, names, lite0.size_multiple)
        out["boxes"] = boxes_table(lite0, dataset, names, box_inputs, lite0.default_stop_stride)
        print("## 3. Boxes on composite-dev\n\n" + markdown(out["boxes"]) + "\n", flush=True)
    if "4" in parts:
        out["memory"] = memory_table(manifests["efficientnet_lite0"], 512)
        print("## 4. Peak memory of the region stage\n\n" + markdown(out["memory"]) + "\n", flush=True)
    if "5" in parts:
        index_inputs = load_inputs(dataset, positives[: args.index_images], lite0.size_multiple)
        batches = (1, ServerConfig().batcher.max_batch)
        out["indexing"] = indexing_table(lite0, index_inputs, ("adjoint", "exact"), batches)
        print("## 5. Indexing cost per image against gem\n\n" + markdown(out["indexing"]) + "\n")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
