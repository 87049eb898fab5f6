"""Quality table: every recipe (with and without spatial re-ranking and query expansion where they apply) on
holidays-dev, ukbench-dev and composite-dev, through the serving code in-process (InstanceSearch).

Each dataset is indexed once with every recipe (they share the backbone run and the DASR* regions), then
every query image is described once for all recipes and searched under each configuration. Indexing cost
per recipe is timed separately, on a few images, with nothing shared (backbone included).

    python bench/quality.py --models /tmp/models --data ../shared/data --work /tmp/inserve-quality

writes bench/quality.md, bench/quality.json and bench/quality.png. --work keeps the indexes: a second run
reuses them (delete the folder to re-index).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from inserve.server.codebook import learn_codebook, save_codebook, vectors_from_index
from inserve.server.config import CamConfig, RegionRecipeConfig, ServerConfig
from inserve.server.evaluation import Dataset, index_dataset, run_query_set
from inserve.server.index import InstanceIndex
from inserve.server.instance_search import InstanceSearch
from inserve.server.recipes import RECIPES, recipe_specs
from inserve.server.search import SearchOptions

log = logging.getLogger("quality")

DATASETS = ("holidays-dev", "ukbench-dev", "composite-dev")
# dasr_star_vlad's codebook is learned on another dataset than the one searched (seed 004)
CODEBOOK_FROM = {"holidays-dev": "ukbench-dev", "ukbench-dev": "holidays-dev", "composite-dev": "holidays-dev"}
TIMING_IMAGES = 12
RERANK, EXPAND = 100, 5


@dataclass(frozen=True)
class Variant:
    recipe: str
    label: str
    options: SearchOptions
    cam_mode: str = "offline"


def variants() -> list[Variant]:
    """The configurations of the table: each recipe plain, then with its second stages."""
    plain = SearchOptions(query_expansion=0, rerank_top=0)
    qe = SearchOptions(query_expansion=EXPAND, rerank_top=0)
    rr = SearchOptions(query_expansion=0, rerank_top=RERANK)
    both = SearchOptions(query_expansion=EXPAND, rerank_top=RERANK)
    out = []
    for recipe in RECIPES:
        out.append(Variant(recipe, recipe, plain))
        if recipe in ("mac", "spoc", "gem", "crow", "dasr", "dasr_star"):
            out.append(Variant(recipe, f"{recipe} +QE{EXPAND}", qe))
        else:
            out.append(Variant(recipe, f"{recipe} +R{RERANK}", rr))
            out.append(Variant(recipe, f"{recipe} +R{RERANK}+QE{EXPAND}", both))
        if recipe == "cam":
            out.append(Variant(recipe, "cam online", plain, "online"))
            out.append(Variant(recipe, f"cam online +R{RERANK}", rr, "online"))
    return out


def config(args: argparse.Namespace, data_dir: Path, cam_mode: str = "offline") -> ServerConfig:
    return ServerConfig(
        data_dir=data_dir,
        models=args.models,
        recipes=RECIPES,
        cam=CamConfig(mode=cam_mode),
        # no detector weights ship: deep_region crops its top-2 DASR* regions, deepvision uses DASR* regions
        regions=RegionRecipeConfig(deep_region_source="dasr_star"),
    )


def index_all(args: argparse.Namespace) -> None:
    for name in args.datasets:
        data_dir = args.work / name
        service = InstanceSearch(config(args, data_dir))
        try:
            dataset = Dataset.load(args.data / name)
            if service.index.count_images() != len(dataset.images):
                if service.index.count_images():
                    raise SystemExit(f"{data_dir} holds a partial index: delete it and run again")
                seconds = index_dataset(service, dataset, progress(f"index {name}"))
                log.info("%s: indexed %d images in %.0f s", name, len(dataset.images), seconds)
        finally:
            service.close()


def set_codebooks(args: argparse.Namespace) -> dict[str, str]:
    sources = {}
    for name in args.datasets:
        other = CODEBOOK_FROM[name]
        service = InstanceSearch(config(args, args.work / name))
        try:
            if service.index.learned("dasr_star_vlad", "codebook") is None:
                vectors = vectors_from_index(args.work / other)
                centroids = learn_codebook(vectors, service.config.regions.vlad_k)
                save_codebook(service.index, centroids, f"{other} ({len(vectors)} DASR* regions)")
                service.relearn_whitening()
            sources[name] = service.index.learned("dasr_star_vlad", "codebook")[2]
        finally:
            service.close()
    return sources


def timing(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Indexing ms per image of each recipe alone (backbone included), and index bytes per image."""
    name = args.datasets[0]
    dataset = Dataset.load(args.data / name)
    out: dict[str, dict[str, float]] = {}
    service = InstanceSearch(config(args, args.work / name))
    try:
        inputs = [service.load(dataset.path(image).read_bytes()) for image in dataset.images[:TIMING_IMAGES]]
        service.pipeline.describe(inputs[:2], ["gem"])  # warm the engines
        for recipe in RECIPES:
            service.pipeline.describe(inputs[:1], [recipe])  # and the recipe's own graphs
            start = time.perf_counter()
            service.pipeline.describe(inputs, [recipe])
            out[recipe] = {"ms_per_image": 1000 * (time.perf_counter() - start) / len(inputs)}
        for dataset_name in args.datasets:
            index = InstanceIndex(args.work / dataset_name, specs=recipe_specs(service.recipes))
            images = index.count_images()
            for recipe in RECIPES:
                out[recipe][f"bytes_per_image:{dataset_name}"] = index.recipe_bytes(recipe) / images
            index.close()
    finally:
        service.close()
    return out


def evaluate_all(args: argparse.Namespace) -> list[dict]:
    rows = []
    for name in args.datasets:
        dataset = Dataset.load(args.data / name)
        for mode in ("offline", "online"):
            chosen = [v for v in variants() if v.cam_mode == mode and v.recipe in args.recipes]
            if not chosen:
                continue
            service = InstanceSearch(config(args, args.work / name, mode))
            try:
                start = time.perf_counter()
                results = run_query_set(
                    service, dataset, [(v.recipe, v.options) for v in chosen], progress(f"search {name} {mode}")
                )
                log.info("%s %s: %d configurations in %.0f s", name, mode, len(chosen), time.perf_counter() - start)
            finally:
                service.close()
            for v, r in zip(chosen, results):
                rows.append(
                    {
                        "dataset": name,
                        "recipe": v.recipe,
                        "variant": v.label,
                        "map": r.map,
                        "mp10": r.mp10,
                        "loc_iou50": r.loc_iou50,
                        "search_ms": 1000 * r.seconds / len(dataset.queries),
                    }
                )
    return rows


def progress(label: str):
    def report(stage: str, done: int, total: int) -> None:
        if done == total or done % 50 == 0:
            log.info("%s: %d/%d", label, done, total)

    return report


def markdown(rows: list[dict], costs: dict, codebooks: dict[str, str], datasets: tuple[str, ...]) -> str:
    by = {(r["variant"], r["dataset"]): r for r in rows}
    labels = list(dict.fromkeys(r["variant"] for r in rows))
    recipe_of = {r["variant"]: r["recipe"] for r in rows}
    head = ["recipe"]
    for d in datasets:
        short = d.removesuffix("-dev")
        head += [f"{short} mAP", f"{short} mP@10"]
        if d == "composite-dev":
            head.append("composite loc@0.5")
    head += ["bytes/image", "index ms/image"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label in labels:
        cells = [label]
        for d in datasets:
            r = by.get((label, d))
            cells += [f"{r['map']:.3f}", f"{r['mp10']:.3f}"] if r else ["", ""]
            if d == "composite-dev":
                loc = r["loc_iou50"] if r else None
                cells.append("" if loc is None else f"{loc:.3f}")
        cost = costs.get(recipe_of[label], {})
        sizes = [v for k, v in cost.items() if k.startswith("bytes_per_image:")]
        cells.append(f"{sum(sizes) / len(sizes) / 1024:.0f} KiB" if sizes else "")
        cells.append(f"{cost['ms_per_image']:.0f}" if "ms_per_image" in cost else "")
        lines.append("| " + " | ".join(cells) + " |")
    sources = "; ".join(f"{d}: {s}" for d, s in codebooks.items())
    return "\n".join(
        [
            "# Quality of every recipe (efficientnet_lite0, long side 512, CPU)",
            "",
            "Generated by `bench/quality.py` (see bench/README.md for the command and the findings).",
            f"+R{RERANK}: spatial re-ranking of the top {RERANK} by the best-matching region; +QE{EXPAND}: "
            f"query expansion with the top {EXPAND}. loc@0.5: fraction of composite positives returned with a box "
            "of IoU >= 0.5 (empty: the configuration returns no boxes). bytes/image: raw vectors in SQLite plus "
            "HNSW level-0 entries, mean over the three indexes. index ms/image: the recipe alone, backbone "
            f"included, mean over {TIMING_IMAGES} holidays images on the shared 2-core CPU.",
            "deepvision and deep_region use DASR* regions here (no detector weights ship); dasr_star_vlad's "
            f"codebook (k = 4) comes from another dataset ({sources}).",
            "",
            *lines,
            "",
        ]
    )


def chart(rows: list[dict], datasets: tuple[str, ...], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = list(dict.fromkeys(r["variant"] for r in rows))
    by = {(r["variant"], r["dataset"]): r["map"] for r in rows}
    x = np.arange(len(labels))
    width = 0.8 / len(datasets)
    fig, ax = plt.subplots(figsize=(max(12, 0.45 * len(labels)), 5.5))
    for i, d in enumerate(datasets):
        ax.bar(x + (i - (len(datasets) - 1) / 2) * width, [by.get((label, d), 0) for label in labels], width, label=d)
    ax.set_xticks(x, labels, rotation=70, ha="right", fontsize=8)
    ax.set_ylabel("mAP")
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    ax.set_title("inserve recipes, efficientnet_lite0 (bench/quality.py)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/inserve-quality"), help="indexes, kept for reruns")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES))
    args = parser.parse_args(argv)
    args.datasets = tuple(args.datasets)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    args.work.mkdir(parents=True, exist_ok=True)
    index_all(args)
    codebooks = set_codebooks(args)
    rows = evaluate_all(args)
    costs = timing(args)
    (args.out / "quality.json").write_text(json.dumps({"rows": rows, "costs": costs, "codebooks": codebooks}, indent=1))
    (args.out / "quality.md").write_text(markdown(rows, costs, codebooks, args.datasets))
    chart(rows, args.datasets, args.out / "quality.png")
    print((args.out / "quality.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
