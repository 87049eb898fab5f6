"""Quality table: every recipe (with and without spatial re-ranking and query expansion where they apply) on
holidays-dev, ukbench-dev and composite-dev, with the serving code in-process.

One indexing pass per dataset serves every recipe: each batch of images runs the backbone once, DASR and
DASR* once, then every recipe describes it into its own index (one data directory per recipe, so that a
recipe can be re-indexed alone). DASR regions are cached on disk per image, so a re-run or a re-indexed
recipe does not back-propagate again. Each recipe is measured as the service stores it (no whitening, the
default) and, where it has a space that learns one, also from a copy of its index (WORK/DATASET/RECIPE+W)
PCA-whitened on the index's own vectors as `inserve whiten` does (IndexConfig.whiten_shrinkage regularises
it). Each query image runs the backbone once for all recipes; hits come from each recipe's
InstanceSearch.find, as the server's would.

    python bench/quality.py --models models --data ../shared/data --work /tmp/inserve-quality

writes bench/quality.md, bench/quality.json and bench/quality.png. --work keeps indexes, region cache and
results; delete WORK/DATASET/RECIPE (or pass --reindex RECIPE...) to index a recipe again, --rewhiten to
learn the whitenings again (from the unwhitened copy).
"""

from __future__ import annotations

import argparse
import json
import logging
import pickle
import shutil
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from inserve.engines import EngineOptions
from inserve.server.codebook import CODEBOOK, learn_codebook, save_codebook, vectors_from_index
from inserve.server.config import REGION_MODES, STAR_SEED_RULES, CamConfig, DasrConfig, RegionRecipeConfig, ServerConfig
from inserve.server.evaluation import Dataset, QueryScores, ranking_all
from inserve.server.imaging import NetworkInput
from inserve.server.index import DEFAULT_SPEC
from inserve.server.instance_search import InstanceSearch
from inserve.server.models import ModelBundle
from inserve.server.pipeline import Pipeline
from inserve.server.recipes import RECIPES, FeatureBatch, build_recipes, sources
from inserve.server.recipes.crops import covers
from inserve.server.search import SearchOptions
from inserve.server.stages.dasr import Regions

log = logging.getLogger("quality")

DATASETS = ("holidays-dev", "ukbench-dev", "composite-dev")
# dasr_star_vlad's codebook is learned on another dataset than the one searched (seed 004)
CODEBOOK_FROM = {"holidays-dev": "ukbench-dev", "ukbench-dev": "holidays-dev", "composite-dev": "holidays-dev"}
# the DASR peaks each recipe's regions come from (deepvision and deep_region: no detector weights ship)
DASR_OF = {
    "dasr": "dasr",
    "dasr_star": "dasr_star",
    "dasr_star_vlad": "dasr_star",
    "dasr_star_crops": "dasr_star",
    "deepvision": "dasr_star",
    "deep_region": "dasr_star",
    "whole_and_regions": "dasr_star",
}
# recipes whose query finds DASR* regions in the query image itself
QUERY_REGIONS = ("dasr_star_vlad", "deep_region", "whole_and_regions")
RERANK, EXPAND = 100, 5
WHITENED = "+W"  # suffix of the whitened copy of a recipe's index, and of its variants' labels
TIMED = "holidays-dev"  # the dataset whose indexing pass gives the ms/image column
CHUNK = 64  # images loaded at a time (grouped into bucket batches of BATCH)
BATCH = 8


@dataclass(frozen=True)
class Variant:
    recipe: str
    label: str
    options: SearchOptions
    cam_mode: str = "offline"
    whitened: bool = False


def variants(recipes: tuple[str, ...], whitening: frozenset[str], fused: frozenset[str]) -> list[Variant]:
    """Each recipe plain, then with the second stages that apply to it (none to `fused` recipes, which score
    every candidate on all their spaces); those of recipes with a space that learns a whitening also whitened."""
    plain = SearchOptions(query_expansion=0, rerank_top=0)
    qe = SearchOptions(query_expansion=EXPAND, rerank_top=0)
    rr = SearchOptions(query_expansion=0, rerank_top=RERANK)
    both = SearchOptions(query_expansion=EXPAND, rerank_top=RERANK)
    out = []
    for recipe in recipes:
        out.append(Variant(recipe, recipe, plain))
        if recipe in fused:
            continue
        if recipe in ("mac", "spoc", "gem", "crow", "dasr", "dasr_star", "dasr_star_crops"):
            # no region space (global ones), or the first stage already compares regions (region ones)
            out.append(Variant(recipe, f"{recipe} +QE{EXPAND}", qe))
        else:
            out.append(Variant(recipe, f"{recipe} +R{RERANK}", rr))
            out.append(Variant(recipe, f"{recipe} +R{RERANK}+QE{EXPAND}", both))
        if recipe == "cam":
            out.append(Variant(recipe, "cam online", plain, "online"))
            out.append(Variant(recipe, f"cam online +R{RERANK}", rr, "online"))
    return [
        each
        for v in out
        for each in (v, replace(v, label=f"{v.label} {WHITENED}", whitened=True))
        if not each.whitened or v.recipe in whitening
    ]


class RegionCache:
    """DASR regions per (image, peaks) in network pixels, and the seconds per image of the back-propagation
    that found them (DASR and DASR* share one), in one pickle. A cache written for another export, DASR
    setting or long side (its `key`) is not used."""

    def __init__(self, path: Path, key: str) -> None:
        self.path, self.key = path, key
        self.regions: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
        self.seconds: dict[str, float] = {}
        if path.is_file():
            stored = pickle.loads(path.read_bytes())
            if len(stored) == 3 and stored[0] == key:
                _, self.regions, self.seconds = stored
            else:
                log.warning("%s was written for other models or settings; finding the regions again", path)

    def fill(self, batch: FeatureBatch, names: list[str], kinds: list[str], config: ServerConfig) -> float:
        """Put the batch's regions of these kinds in place, computing the missing kinds together; returns the
        seconds of the back-propagation that found them, summed over the images."""
        missing = [k for k in kinds if any((name, k) not in self.regions for name in names)]
        if missing:
            batch.dasr_peaks = tuple(missing)
            start = time.perf_counter()
            found = {kind: sources.dasr(batch, kind, config.dasr) for kind in missing}
            each = (time.perf_counter() - start) / len(names)
            for kind, regions in found.items():
                for name, r in zip(names, regions):
                    self.regions[(name, kind)] = (r.boxes, r.scores)
            for name in names:
                self.seconds[name] = each
        for kind in kinds:
            batch.derived[sources.dasr_key(kind, config.dasr)] = [Regions(*self.regions[(n, kind)]) for n in names]
        return sum(self.seconds[name] for name in names) if kinds else 0.0

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_bytes(pickle.dumps((self.key, self.regions, self.seconds)))
        tmp.replace(self.path)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.base = ServerConfig(
            models=args.models,
            recipes=RECIPES,
            engine=EngineOptions(device="cpu"),
            # no detector weights ship: deep_region crops its top-2 DASR* regions, deepvision uses DASR* regions
            regions=RegionRecipeConfig(deep_region_source="dasr_star"),
            dasr=DasrConfig(
                mode=args.dasr_mode, sigmas=args.sigmas, star_seeds=args.star_seeds, max_regions=args.max_regions
            ),
        )
        self.models = ModelBundle.open(args.models, self.base.backbone, self.base.engine)
        self.pipeline = Pipeline(self.models, build_recipes(RECIPES, self.base), self.base.image)
        self.regions_key = repr((self.models.manifest, self.base.dasr, self.base.image.long_side))
        self.whitening = frozenset(
            name
            for name, recipe in self.pipeline.recipes.items()
            if any(recipe.spaces().get(kind, DEFAULT_SPEC).whiten for kind in (recipe.search_kind, *recipe.spaces()))
        )
        self.fused = frozenset(n for n, recipe in self.pipeline.recipes.items() if recipe.region_set_weight is not None)

    def data_dir(self, dataset: str, recipe: str, whitened: bool = False) -> Path:
        return self.args.work / dataset / (recipe + WHITENED if whitened else recipe)

    def core(self, dataset: str, recipe: str, cam_mode: str = "offline", whitened: bool = False) -> InstanceSearch:
        config = replace(
            self.base,
            data_dir=self.data_dir(dataset, recipe, whitened),
            recipes=(recipe,),
            cam=CamConfig(mode=cam_mode),
        )
        return InstanceSearch(config, self.models)

    def whiten_copy(self, dataset: str, recipe: str) -> None:
        """Copy the recipe's unwhitened index and learn every space's whitening in the copy."""
        whitened = self.data_dir(dataset, recipe, whitened=True)
        shutil.rmtree(whitened, ignore_errors=True)
        shutil.copytree(self.data_dir(dataset, recipe), whitened, ignore=shutil.ignore_patterns("complete"))
        core = self.core(dataset, recipe, whitened=True)
        try:
            core.learn_whitening()
        finally:
            core.close()

    def chunks(self, dataset: Dataset, names: list[str]):
        """(names, inputs) batches of one shape bucket, at most BATCH each."""
        for first in range(0, len(names), CHUNK):
            loaded = [(n, self.pipeline.load(dataset.path(n).read_bytes())) for n in names[first : first + CHUNK]]
            by_bucket: dict[tuple[int, int], list[tuple[str, NetworkInput]]] = defaultdict(list)
            for name, inp in loaded:
                by_bucket[self.pipeline.bucket(inp)].append((name, inp))
            for group in by_bucket.values():
                for start in range(0, len(group), BATCH):
                    part = group[start : start + BATCH]
                    yield [n for n, _ in part], [inp for _, inp in part]

    def index(self, name: str) -> None:
        """Index the recipes whose index is missing or incomplete, in one pass over the images."""
        work = self.args.work / name
        todo = [r for r in self.args.recipes if not (work / r / "complete").is_file()]
        if not todo:
            return
        dataset = Dataset.load(self.args.data / name)
        for recipe in todo:
            shutil.rmtree(self.data_dir(name, recipe), ignore_errors=True)
            shutil.rmtree(self.data_dir(name, recipe, whitened=True), ignore_errors=True)
        cache = RegionCache(work / "regions.pkl", self.regions_key)
        cores = {recipe: self.core(name, recipe) for recipe in todo}
        seconds: dict[str, float] = defaultdict(float)
        peaks_needed = sorted({DASR_OF[r] for r in todo if r in DASR_OF})
        done = 0
        try:
            for names, inputs in self.chunks(dataset, dataset.images):
                start = time.perf_counter()
                batch = self.pipeline.features(inputs)
                seconds["backbone"] += time.perf_counter() - start
                seconds["dasr regions"] += cache.fill(batch, names, peaks_needed, self.base)
                for recipe in todo:
                    start = time.perf_counter()
                    described = self.pipeline.recipes[recipe].describe(batch)
                    seconds[recipe] += time.perf_counter() - start
                    for image, inp, vectors in zip(names, inputs, described):
                        cores[recipe].index.add_image(
                            image, vectors.vectors, width=inp.width, height=inp.height, source=str(dataset.path(image))
                        )
                done += len(names)
                if done % 16 < len(names):
                    cache.save()
                    log.info("%s: indexed %d/%d images", name, done, len(dataset.images))
            cache.save()
            for recipe in todo:
                core = cores.pop(recipe)
                core.relearn_whitening()  # what the service learns as the index grows (compact spaces' PCA)
                own = seconds[recipe] + seconds["backbone"] + (seconds["dasr regions"] if recipe in DASR_OF else 0.0)
                stats = {
                    "ms_per_image": 1000 * own / len(dataset.images),
                    "bytes_per_image": core.index.recipe_bytes(recipe) / len(dataset.images),
                }
                core.close()
                if recipe in self.whitening and recipe != "dasr_star_vlad":  # whitened once set_codebook has run
                    self.whiten_copy(name, recipe)
                (work / recipe / "complete").write_text(json.dumps(stats))
                self.forget_results(name, recipe)
        finally:
            for core in cores.values():
                core.close()

    def rewhiten(self, name: str) -> None:
        """Learn every space's whitening again from the stored vectors (after a change to the whitening)."""
        for recipe in self.args.recipes:
            if recipe in self.whitening and (self.args.work / name / recipe / "complete").is_file():
                self.whiten_copy(name, recipe)
                self.forget_results(name, recipe)

    def set_codebook(self, name: str) -> str:
        """dasr_star_vlad's codebook for this dataset, learned on another one's DASR* regions."""
        core = self.core(name, "dasr_star_vlad")
        try:
            if core.index.learned("dasr_star_vlad", CODEBOOK) is None:
                other = CODEBOOK_FROM[name]
                vectors = vectors_from_index(self.data_dir(other, "dasr_star_vlad"))
                centroids = learn_codebook(vectors, core.config.regions.vlad_k)
                save_codebook(core.index, centroids, f"{other} ({len(vectors)} DASR* regions)")
                core.close()
                self.whiten_copy(name, "dasr_star_vlad")
                self.forget_results(name, "dasr_star_vlad")
                core = self.core(name, "dasr_star_vlad")
            return core.index.learned("dasr_star_vlad", CODEBOOK)[2]
        finally:
            core.close()

    def results_path(self, name: str) -> Path:
        return self.args.work / name / "results.json"

    def forget_results(self, name: str, recipe: str) -> None:
        path = self.results_path(name)
        if path.is_file():
            rows = [r for r in json.loads(path.read_text()) if r["recipe"] != recipe]
            path.write_text(json.dumps(rows, indent=1))

    def evaluate(self, name: str) -> list[dict]:
        """Every query under every variant not measured yet (results kept in WORK/DATASET/results.json)."""
        path = self.results_path(name)
        rows = json.loads(path.read_text()) if path.is_file() else []
        measured = {r["variant"] for r in rows}
        chosen = [v for v in variants(self.args.recipes, self.whitening, self.fused) if v.label not in measured]
        if not chosen:
            return rows
        dataset = Dataset.load(self.args.data / name)
        cache = RegionCache(self.args.work / name / "regions.pkl", self.regions_key)
        keys = dict.fromkeys((v.recipe, v.cam_mode, v.whitened) for v in chosen)
        cores = {key: self.core(name, *key) for key in keys}
        scores = [QueryScores() for _ in chosen]
        try:
            for n, q in enumerate(dataset.queries):
                start = time.perf_counter()
                inp = self.pipeline.load(dataset.path(q.image).read_bytes())
                box = self.pipeline.query_job(inp, q.box, chosen[0].recipe).box
                batch = self.pipeline.features([inp])
                shared = time.perf_counter() - start
                query_regions = 0.0  # the DASR* regions of the query image, for the recipes that find them
                if covers(inp.pixels, box) and any(key[0] in QUERY_REGIONS for key in cores):
                    query_regions = cache.fill(batch, [q.image], ["dasr_star"], self.base)
                queries, spent = {}, {}
                for (recipe, mode, _), core in cores.items():
                    if (recipe, mode) not in queries:
                        start = time.perf_counter()
                        queries[(recipe, mode)] = core.recipes[recipe].query(batch, box)
                        spent[recipe, mode] = time.perf_counter() - start + shared
                        spent[recipe, mode] += query_regions if recipe in QUERY_REGIONS else 0.0
                for v, score in zip(chosen, scores):
                    core = cores[(v.recipe, v.cam_mode, v.whitened)]
                    query = queries[(v.recipe, v.cam_mode)]
                    score.add(q, core.find(ranking_all(core, v.recipe, v.options, len(dataset.images)), query))
                    start = time.perf_counter()  # the latency of a search as served: the default top_k
                    core.find(core.plan(v.recipe, options=v.options), query)
                    score.seconds += time.perf_counter() - start + spent[v.recipe, v.cam_mode]
                if (n + 1) % 50 == 0:
                    cache.save()
                    log.info("%s: %d/%d queries", name, n + 1, len(dataset.queries))
            cache.save()
        finally:
            for core in cores.values():
                core.close()
        for v, score in zip(chosen, scores):
            result = score.result()
            rows.append(
                {
                    "dataset": name,
                    "recipe": v.recipe,
                    "variant": v.label,
                    "map": result.map,
                    "mp10": result.mp10,
                    "loc_iou50": result.loc_iou50,
                    "query_ms": 1000 * result.seconds / len(dataset.queries),
                }
            )
        path.write_text(json.dumps(rows, indent=1))
        return rows

    def costs(self, name: str) -> dict[str, dict[str, float]]:
        return {
            recipe: json.loads((self.args.work / name / recipe / "complete").read_text())
            for recipe in self.args.recipes
        }


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
    head += ["KiB/image", "index ms/image", "query ms"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label in labels:
        cells = [label]
        for d in datasets:
            r = by.get((label, d))
            cells += [f"{r['map']:.3f}", f"{r['mp10']:.3f}"] if r else ["", ""]
            if d == "composite-dev":
                loc = r["loc_iou50"] if r else None
                cells.append("" if loc is None else f"{loc:.3f}")
        per = [costs[d][recipe_of[label]] for d in datasets if recipe_of[label] in costs.get(d, {})]
        cells.append(f"{np.mean([c['bytes_per_image'] for c in per]) / 1024:.1f}" if per else "")
        timed = costs.get(TIMED, {}).get(recipe_of[label])
        cells.append(f"{timed['ms_per_image']:.0f}" if timed else "")
        query = by.get((label, TIMED), {}).get("query_ms")
        cells.append("" if query is None else f"{query:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    sources_text = "; ".join(f"{d}: {s}" for d, s in codebooks.items())
    return "\n".join(
        [
            "# Quality of every recipe (efficientnet_lite0, long side 512, CPU)",
            "",
            "Generated by `bench/quality.py` (see bench/README.md, section Recipe quality, for the command and the "
            "findings).",
            f"+R{RERANK}: spatial re-ranking of the top {RERANK} by the best-matching region; +QE{EXPAND}: query "
            f"expansion with the top {EXPAND}; {WHITENED}: the index PCA-whitened on its own vectors (`inserve "
            f"whiten`), rows without it are as the service stores by default (no whitening; recipes with no "
            f"{WHITENED} row learn none). loc@0.5: fraction of composite positives returned with a box of IoU "
            ">= 0.5 (empty: no boxes returned). KiB/image: raw vectors in SQLite plus HNSW level-0 entries, mean "
            "over the three indexes. index ms/image: backbone + DASR regions (recipes that use them; DASR and DASR* "
            "come from one back-propagation of the union of their seeds) + the recipe's own stages, in the "
            f"{TIMED} indexing pass, batches of 8, on a 2-core CPU (one pass: a single measurement). query ms: "
            f"mean over {TIMED}'s queries of decoding, the backbone, the query's own DASR* regions (recipes that "
            "find them), the recipe's query vector and a search for the default top_k, one query at a time.",
            "deepvision and deep_region use DASR* regions here (no detector weights ship); dasr_star_vlad's "
            f"codebook (k = 4) comes from another dataset ({sources_text}).",
            "",
            *lines,
            "",
        ]
    )


def chart(rows: list[dict], datasets: tuple[str, ...], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(r["variant"] for r in rows))
    by = {(r["variant"], r["dataset"]): r["map"] for r in rows}
    y = np.arange(len(labels))
    height = 0.8 / len(datasets)
    fig, ax = plt.subplots(figsize=(8, max(6, 0.26 * len(labels))))
    for i, d in enumerate(datasets):
        offset = (i - (len(datasets) - 1) / 2) * height
        ax.barh(y + offset, [by.get((label, d), 0) for label in labels], height, label=d)
    ax.set_yticks(y, labels, fontsize=8)
    ax.set_ylim(len(labels) - 0.5, -0.5)  # first label on top, no empty margin
    ax.set_xlabel("mAP")
    ax.set_xlim(0, 1)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(datasets), frameon=False)  # off the bars
    ax.set_title("inserve recipes, efficientnet_lite0 (bench/quality.py)", pad=22)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/inserve-quality"), help="kept between runs")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES))
    parser.add_argument("--reindex", nargs="*", default=[], help="recipes to index again")
    parser.add_argument("--rewhiten", action="store_true", help="learn the whitenings again (no CNN)")
    parser.add_argument("--dasr-mode", default=DasrConfig.mode, choices=REGION_MODES, help="DASR region mode")
    parser.add_argument("--sigmas", type=float, default=DasrConfig.sigmas, help="adjoint boxes: standard deviations")
    parser.add_argument("--star-seeds", default=DasrConfig.star_seeds, choices=STAR_SEED_RULES)
    parser.add_argument("--max-regions", type=int, default=DasrConfig.max_regions, help="DASR regions per image")
    args = parser.parse_args(argv)
    args.datasets, args.recipes = tuple(args.datasets), tuple(args.recipes)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    for name in args.datasets:
        for recipe in args.reindex:
            shutil.rmtree(args.work / name / recipe, ignore_errors=True)
    bench = Bench(args)
    for name in args.datasets:
        if args.rewhiten:
            bench.rewhiten(name)
        bench.index(name)
    codebooks = {name: bench.set_codebook(name) for name in args.datasets if "dasr_star_vlad" in args.recipes}
    rows = [row for name in args.datasets for row in bench.evaluate(name) if row["recipe"] in args.recipes]
    costs = {name: bench.costs(name) for name in args.datasets}
    order = {v.label: i for i, v in enumerate(variants(args.recipes, bench.whitening, bench.fused))}
    rows.sort(key=lambda r: order.get(r["variant"], len(order)))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality.json").write_text(json.dumps({"rows": rows, "costs": costs, "codebooks": codebooks}, indent=1))
    (args.out / "quality.md").write_text(markdown(rows, costs, codebooks, args.datasets))
    chart(rows, args.datasets, args.out / "quality.png")
    print((args.out / "quality.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
