"""Fusing a whole-image descriptor with region crops (issue 13): mAP of each fusion rule and weight on the dev sets.

    python bench/fusion.py --models bench/out/models --data ../shared/data

Embeds every database image once with gem (global) and dasr_star_crops (DASR* regions plus the whole image,
cropped and re-embedded), and every query with both and with its own regions; caches the vectors in --work.
Then, for every query and database image, the component similarities:
- `global`: cosine of the GeM vectors, PCA-whitened as `inserve whiten` learns it on the database (shrinkage
  IndexConfig.whiten_shrinkage), or raw;
- `region`: the best cosine between the query's crop (its box, or the whole image) and the image's regions;
- `regions`: the best cosine between any of the query's own regions (and its whole crop) and the image's regions,
- `own mean`: the mean over the query's own regions of each one's best match among the image's regions,
- `region views S`: `region` with the crop also seen at long side S (crops.low_resolution_view), the better of
  the two views for each region (whole_and_regions: RegionRecipeConfig.query_low_side);
- `whole`: cosine of whole_and_regions' photo vectors (R-MAC of the whole photo), PCA-whitened to WHOLE_DIMS on
  the database,
and prints the mAP of the fusion rules over a sweep of their weight, one table per rule, every dev set side by
side. A rule and a weight are chosen on these dev sets; the recipe then states them.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from inserve.clients.render import HIT_COLOUR, QUERY_COLOUR, Tile, render_results
from inserve.server.config import IndexConfig, RegionRecipeConfig, ServerConfig
from inserve.server.evaluation import Dataset, average_precision
from inserve.server.index.codec import decode_vectors, encode_vector
from inserve.server.models import ModelBundle
from inserve.server.pipeline import DescribeJob, Pipeline
from inserve.server.recipes import build_recipes
from inserve.server.recipes.base import FeatureBatch
from inserve.server.recipes.crops import crop_batch, embed_images, low_resolution_view
from inserve.server.recipes.whole_and_regions import WHOLE_DIMS, whole_photo
from inserve.server.stages.matching import soft_box
from inserve.server.stages.nms import box_iou
from inserve.server.stages.pooling import l2_normalize
from inserve.server.stages.whitening import Whitening, pca_reduce, pca_whiten

DATASETS = ("holidays-dev", "composite-dev", "ukbench-dev")
LOW_SIDES = (64, 80, 96, 112, 128)  # the crop views measured (RegionRecipeConfig.query_low_side)
WEIGHTS = tuple(round(w, 2) for w in np.linspace(0, 1, 11))
log = logging.getLogger("fusion")


def embed(pipeline: Pipeline, dataset: Dataset, cache: Path) -> dict[str, np.ndarray | list]:
    """Database and query vectors of one dataset (cached in `cache`, an .npz per dataset)."""
    if cache.is_file():
        stored = np.load(cache, allow_pickle=True)
        out = {key: stored[key] for key in stored.files}
        if "q_low_96" not in out:  # a cache from before whole_and_regions' photos and crop views: add them
            out.update(photos(pipeline, dataset))
            np.savez(cache, **out)
        return out
    crops = pipeline.recipes["dasr_star_crops"]
    db_global, db_regions, db_boxes = [], [], []
    for n, name in enumerate(dataset.images):
        inp = pipeline.load(dataset.path(name).read_bytes())
        (described,) = pipeline.run([DescribeJob(inp)])
        db_global.append(described["gem"].vectors[0].raw[0])
        regions = described["dasr_star_crops"]
        db_regions.append(l2_normalize(regions.vectors[0].raw))
        db_boxes.append(regions.regions.boxes)
        if n % 50 == 0:
            log.info("%s: %d/%d images", dataset.name, n, len(dataset.images))
    q_global, q_crop, q_regions = [], [], []
    for q in dataset.queries:
        inp = pipeline.load(dataset.path(q.image).read_bytes())
        box = pipeline.query_job(inp, q.box, "gem").box
        batch = pipeline.features([inp])
        q_global.append(pipeline.recipes["gem"].query(batch, box).raw)
        q_crop.append(crops.query(batch, box).raw)
        inner = crop_batch(batch, box, pipeline.image.long_side)
        q_regions.append(l2_normalize(crops.describe(inner)[0].vectors[0].raw))
    out = {
        "db_global": np.stack(db_global),
        "db_regions": np.array(db_regions, dtype=object),
        "db_boxes": np.array(db_boxes, dtype=object),
        "q_global": np.stack(q_global),
        "q_crop": l2_normalize(np.stack(q_crop)),
        "q_regions": np.array(q_regions, dtype=object),
        **photos(pipeline, dataset),
    }
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **out)
    return out


def no_box(dataset: Dataset) -> np.ndarray:
    """Which queries come without a box: whole photos, which whole_and_regions scores by the photo rule."""
    return np.array([q.box is None for q in dataset.queries])


def photos(pipeline: Pipeline, dataset: Dataset) -> dict[str, np.ndarray]:
    """whole_and_regions' photo vectors (R-MAC of the whole photo) of the database and of the queries, and each
    query's crop seen at each of LOW_SIDES (crops.low_resolution_view), re-embedded."""

    def load(name: str) -> FeatureBatch:
        return pipeline.features([pipeline.load(dataset.path(name).read_bytes())])

    def low(batch: FeatureBatch, box: np.ndarray | None, side: int) -> np.ndarray:
        pixels = batch.inputs[0].pixels
        box = np.array([0, 0, pixels.shape[2], pixels.shape[1]], np.float32) if box is None else box
        view = low_resolution_view(pixels, box, side, RegionRecipeConfig.crop_long_side, batch.models.size_multiple)
        return l2_normalize(embed_images(batch.models, [view])[0])

    out = {"db_whole": np.stack([whole_photo(load(name).maps["feat"][0]) for name in dataset.images])}
    q_whole, q_low = [], {side: [] for side in LOW_SIDES}
    for q in dataset.queries:
        batch = load(q.image)
        q_whole.append(whole_photo(batch.maps["feat"][0]))
        box = pipeline.query_job(batch.inputs[0], q.box, "gem").box
        for side in LOW_SIDES:
            q_low[side].append(low(batch, box, side))
    return {**out, "q_whole": np.stack(q_whole), **{f"q_low_{side}": np.stack(v) for side, v in q_low.items()}}


def similarities(vectors: dict, no_box: np.ndarray) -> dict[str, np.ndarray]:
    """(Q, N) component similarities and the index of each image's best region for the query's crop."""
    whitening = pca_whiten(vectors["db_global"], shrinkage=IndexConfig.whiten_shrinkage)
    raw = l2_normalize(vectors["q_global"]) @ l2_normalize(vectors["db_global"]).T
    white = whitening.apply(vectors["q_global"]) @ whitening.apply(vectors["db_global"]).T
    photo_whitening = pca_whiten(vectors["db_whole"], WHOLE_DIMS, shrinkage=IndexConfig.whiten_shrinkage)
    whole = photo_whitening.apply(vectors["q_whole"]) @ photo_whitening.apply(vectors["db_whole"]).T
    queries, images = raw.shape
    region = np.zeros((queries, images), np.float32)
    regions = np.zeros((queries, images), np.float32)
    regions_mean = np.zeros((queries, images), np.float32)
    own_mean = np.zeros((queries, images), np.float32)
    best = np.zeros((queries, images), np.int64)
    views = np.zeros((len(LOW_SIDES), queries, images), np.float32)
    for j, r in enumerate(vectors["db_regions"]):
        crop = vectors["q_crop"] @ r.T  # (Q, n_j)
        region[:, j], best[:, j] = crop.max(1), crop.argmax(1)
        for k, side in enumerate(LOW_SIDES):  # the crop's best view (as given, or as seen at `side`)
            views[k][:, j] = np.maximum(crop, vectors[f"q_low_{side}"] @ r.T).max(1)
        for i, own in enumerate(vectors["q_regions"]):
            # best match of each of the query's own regions (the last is its whole image: the crop stands for it)
            each = np.concatenate([(own[:-1] @ r.T).max(1), crop[i].max(keepdims=True)])
            regions[i, j], regions_mean[i, j] = each.max(), each.mean()
            own_mean[i, j] = each[:-1].mean() if len(each) > 1 else each[-1]
    return {
        "global": white,
        "global raw": raw,
        "region": region,
        **{f"region views {side}": views[k] for k, side in enumerate(LOW_SIDES)},
        "regions": regions,
        "regions mean": regions_mean,
        "own mean": own_mean,
        "whole": whole,
        "no box": no_box,
        "best": best,
    }


def query_aps(dataset: Dataset, scores: np.ndarray) -> np.ndarray:
    aps = []
    for q, row in zip(dataset.queries, scores):
        ranked = [dataset.images[j] for j in np.argsort(-row, kind="stable")]
        aps.append(average_precision(ranked, q.positives, q.junk))
    return np.array(aps)


def scores_map(dataset: Dataset, scores: np.ndarray) -> float:
    return float(query_aps(dataset, scores).mean())


def per_query(found: dict, rule: str, weight: float, worst: int = 3) -> None:
    """The served rule against plain gem (unwhitened, as the service stores it), query by query."""
    print(f"\n{rule} at {weight} against gem, per query (equal: |AP difference| < 0.005)\n")
    print("| dataset | better | worse | equal | mean AP difference | worst queries (gem AP -> AP) |")
    print("|---|---|---|---|---|---|")
    for name, (dataset, _, sims) in found.items():
        ours, gem = query_aps(dataset, RULES[rule](sims, weight)), query_aps(dataset, sims["global raw"])
        delta = ours - gem
        lows = ", ".join(f"{dataset.queries[i].image} {gem[i]:.2f} -> {ours[i]:.2f}" for i in np.argsort(delta)[:worst])
        counts = f"{(delta >= 0.005).sum()} | {(delta <= -0.005).sum()} | {(abs(delta) < 0.005).sum()}"
        print(f"| {name} | {counts} | {delta.mean():+.3f} | {lows} |")


def localisation(dataset: Dataset, vectors: dict, best: np.ndarray) -> float | None:
    """Share of positives with a box whose best region (for the query's crop) has IoU >= 0.5 with the truth."""
    index = {name: j for j, name in enumerate(dataset.images)}
    located, total = 0, 0
    for i, q in enumerate(dataset.queries):
        for name, truth in q.boxes.items():
            j = index[name]
            box = vectors["db_boxes"][j][best[i, j]]
            located += box_iou(np.array(box)[None], np.array(truth)[None])[0, 0] >= 0.5
            total += 1
    return located / total if total else None


def standardized(s: np.ndarray) -> np.ndarray:
    """Each query's similarities (a row) as z-scores over the database: the two terms on one scale."""
    return (s - s.mean(1, keepdims=True)) / s.std(1, keepdims=True).clip(min=1e-6)


def z_sum(s: dict, w: float, region: str = "region") -> np.ndarray:
    return w * standardized(s["global"]) + (1 - w) * standardized(s[region])


MISS_KINDS = ("located", "too large", "part of it", "elsewhere", "shifted")


def miss_kind(box: np.ndarray, truth: np.ndarray) -> str:
    """How a returned box relates to the ground truth: IoU >= 0.5; covering it with as much again or more
    around it; inside it, covering part; (almost) not touching it; or overlapping it otherwise."""
    iou = box_iou(box[None], truth[None])[0, 0]
    if iou >= 0.5:
        return "located"
    width = max(0.0, min(box[2], truth[2]) - max(box[0], truth[0]))
    ix = width * max(0.0, min(box[3], truth[3]) - max(box[1], truth[1]))
    area = (box[2] - box[0]) * (box[3] - box[1])
    truth_area = (truth[2] - truth[0]) * (truth[3] - truth[1])
    if ix >= 0.9 * truth_area:
        return "too large"
    if ix >= 0.9 * area:
        return "part of it"
    return "elsewhere" if ix < 0.1 * truth_area else "shifted"


def misses(dataset: Dataset, vectors: dict, best: np.ndarray, picture: Path | None, per_kind: int = 3) -> None:
    """The composite positives by how the box of their best region (for the query's crop) misses; with
    `picture`, a sheet of the first misses of each kind: ground truth (green) beside the returned box (red)."""
    index = {name: j for j, name in enumerate(dataset.images)}
    kinds: dict[str, list[tuple[str, np.ndarray, np.ndarray]]] = {kind: [] for kind in MISS_KINDS}
    for i, q in enumerate(dataset.queries):
        for name, truth in q.boxes.items():
            box = np.asarray(vectors["db_boxes"][index[name]][best[i, index[name]]], dtype=np.float32)
            kinds[miss_kind(box, np.asarray(truth, dtype=np.float32))].append((name, box, np.asarray(truth)))
    total = sum(len(v) for v in kinds.values())
    print(f"\n{dataset.name}: where the best region's box falls, {total} positives\n")
    missed = [(box, truth) for kind in MISS_KINDS[1:] for _, box, truth in kinds[kind]]
    ious = [box_iou(box[None], truth[None])[0, 0] for box, truth in missed]
    ratios = [np.prod(box[2:] - box[:2]) / np.prod(truth[2:] - truth[:2]) for box, truth in missed]
    print("| " + " | ".join(MISS_KINDS) + " | misses: median IoU | misses: median area / truth's |")
    print("|" + "---|" * (len(MISS_KINDS) + 2))
    shares = " | ".join(f"{len(kinds[k]) / total:.3f}" for k in MISS_KINDS)
    print(f"| {shares} | {np.median(ious):.2f} | {np.median(ratios):.2f} |")
    if picture is None:
        return
    tiles = []
    for kind in MISS_KINDS[1:]:
        for name, box, truth in kinds[kind][:per_kind]:
            image = Image.open(dataset.path(name)).convert("RGB")
            tiles.append(Tile(image, image.width, image.height, tuple(truth), f"{name}\ntruth", QUERY_COLOUR))
            tiles.append(Tile(image, image.width, image.height, tuple(box), f"{kind}", HIT_COLOUR))
    picture.parent.mkdir(parents=True, exist_ok=True)
    render_results(tiles, columns=2 * per_kind).save(picture)
    print(f"\nmisses drawn in {picture} (rows: {', '.join(MISS_KINDS[1:])})")


def compacted(vectors: dict, reduction: Whitening | None) -> dict:
    """The region vectors as a compact space holds them (server/index): the database's stored in int8
    (codec.py), read back and reduced; the query's reduced from float32. None: full dims, float32."""

    def reduce(x: np.ndarray) -> np.ndarray:
        return l2_normalize(x) if reduction is None else reduction.apply(x)

    def stored(x: np.ndarray) -> np.ndarray:
        return reduce(x if reduction is None else decode_vectors([encode_vector(v, int8=True) for v in x]))

    out = dict(vectors)
    out["db_regions"] = np.array([stored(r) for r in vectors["db_regions"]], dtype=object)
    out["q_crop"] = reduce(vectors["q_crop"])
    out.update({f"q_low_{side}": reduce(vectors[f"q_low_{side}"]) for side in LOW_SIDES})
    out["q_regions"] = np.array([reduce(r) for r in vectors["q_regions"]], dtype=object)
    return out


# where each dataset's PCA is learned when not on its own regions: another dev set, as a deployment would learn
# it before indexing its own data
PCA_FROM = {"holidays-dev": "ukbench-dev", "ukbench-dev": "holidays-dev", "composite-dev": "holidays-dev"}
COMPACTIONS = (
    (None, ""),
    (512, "all"),
    (384, "other"),
    (384, "all"),
    (384, "half"),
    (256, "all"),
    (256, "half"),
    (128, "all"),
)
LEARNED_ON = {
    "other": "another dev set",
    "all": "all its regions (after `inserve whiten`, `inserve eval`)",
    "half": "its first half (the least a growing index has learned from)",
}


def compaction(found: dict, weight: float, hnsw_m: int) -> None:
    """mAP of the served rule with the region vectors compacted as the index compacts them (pca_reduce, int8
    raw), the reduction learned on another dev set's regions, on all of the set's own database regions or on
    their first half; and the bytes per region (int8 raw in SQLite + the graph's level-0 entry)."""
    print(f"\n{SERVED} at {weight}, region vectors compacted\n")
    print("| graph holds | PCA learned on | bytes / region | " + " | ".join(found) + " |")
    print("|---|---|---|" + "---|" * len(found))
    for dims, learned_on in COMPACTIONS:
        maps = []
        for name, (dataset, vectors, _) in found.items():
            source = found.get(PCA_FROM[name]) if learned_on == "other" else found[name]
            if dims is not None and source is None:
                maps.append(float("nan"))
                continue
            regions = np.concatenate(list(source[1]["db_regions"]))
            if learned_on == "half":
                regions = regions[: len(regions) // 2]
            reduction = None if dims is None else pca_reduce(regions, dims)
            sims = similarities(compacted(vectors, reduction), no_box(dataset))
            maps.append(scores_map(dataset, RULES[SERVED](sims, weight)))
        d = dims or vectors["db_regions"][0].shape[1]
        raw = 4 * d if dims is None else len(encode_vector(np.zeros(vectors["db_regions"][0].shape[1]), int8=True))
        size = raw + 4 * d + 4 * (2 * hnsw_m + 1) + 8
        label = f"all {d} dims, float32" if dims is None else f"PCA {d} dims (raw int8)"
        print(f"| {label} | {LEARNED_ON.get(learned_on, '')} | {size} | " + " | ".join(f"{m:.3f}" for m in maps) + " |")


def box_sweep(dataset: Dataset, vectors: dict) -> None:
    """Localisation of the served box (stages/matching.py soft_box: region boxes averaged by softmax(similarity
    to the query's crop / t)) over t, every positive; and with the whole-image region (the last) left out
    unless it is the best."""
    index = {name: j for j, name in enumerate(dataset.images)}
    temperatures = (0.0, 0.01, 0.02, 0.03, 0.05, 0.07, 0.1)
    print(f"\n{dataset.name}: localisation of the served box by temperature\n")
    print("| box | " + " | ".join(f"t = {t}" for t in temperatures) + " |\n|---|" + "---|" * len(temperatures))
    for label, whole in (("softmax over every region", True), ("whole image only when best", False)):
        cells = []
        for t in temperatures:
            located, total = 0, 0
            for i, q in enumerate(dataset.queries):
                for name, truth in q.boxes.items():
                    j = index[name]
                    sims = vectors["db_regions"][j] @ vectors["q_crop"][i]
                    if not whole and sims.argmax() != len(sims) - 1:
                        sims[-1] = -np.inf
                    box = soft_box(np.asarray(vectors["db_boxes"][j], np.float64), sims, t)
                    located += box_iou(box[None], np.asarray(truth, np.float64)[None])[0, 0] >= 0.5
                    total += 1
            cells.append(f"{located / total:.3f}")
        print(f"| {label} | " + " | ".join(cells) + " |")


SERVED = "served: without a box v whole + (1-v) own mean, with one w own mean + (1-w) region views"


def served(s: dict, w: float) -> np.ndarray:
    """whole_and_regions (server/search.py region_set_search): a query without a box scores whole_photo_score
    at the configured whole_weight, one with a box region_set_score at weight w."""
    v = RegionRecipeConfig.whole_weight
    views = s[f"region views {RegionRecipeConfig.query_low_side}"]
    return np.where(s["no box"][:, None], v * s["whole"] + (1 - v) * s["own mean"], w * s["own mean"] + (1 - w) * views)


BOX_RULE = "w own mean + (1-w) region"  # region_set_score, the crop as given only
RULES = {
    SERVED: served,
    **{
        f"w own mean + (1-w) region views {side}": lambda s, w, side=side: (
            w * s["own mean"] + (1 - w) * s[f"region views {side}"]
        )
        for side in LOW_SIDES
    },
    "w whole + (1-w) own mean (every query)": lambda s, w: w * s["whole"] + (1 - w) * s["own mean"],
    "w whole + (1-w) served box rule (every query)": lambda s, w: w * s["whole"] + (1 - w) * RULES[BOX_RULE](s, 0.4),
    "w z(global) + (1-w) z(region)": z_sum,
    "w z(global) + (1-w) z(regions)": lambda s, w: z_sum(s, w, "regions"),
    "w z(global) + (1-w) z(regions mean)": lambda s, w: z_sum(s, w, "regions mean"),
    "w z(global) + (1-w)/2 (z(region) + z(regions mean))": lambda s, w: (
        w * standardized(s["global"]) + (1 - w) / 2 * (standardized(s["region"]) + standardized(s["regions mean"]))
    ),
    "w z(regions mean) + (1-w) z(region)": lambda s, w: z_sum({**s, "global": s["regions mean"]}, w),
    "w regions mean + (1-w) region": lambda s, w: w * s["regions mean"] + (1 - w) * s["region"],
    "w own mean + (1-w) region": lambda s, w: w * s["own mean"] + (1 - w) * s["region"],
    "max(z(global), z(region)) + w min": lambda s, w: (
        np.maximum(standardized(s["global"]), standardized(s["region"]))
        + w * np.minimum(standardized(s["global"]), standardized(s["region"]))
    ),
    "w global + (1-w) region": lambda s, w: w * s["global"] + (1 - w) * s["region"],
    "w global + (1-w) regions": lambda s, w: w * s["global"] + (1 - w) * s["regions"],
    "w raw global + (1-w) region": lambda s, w: w * s["global raw"] + (1 - w) * s["region"],
    "max(global, region) + w min": lambda s, w: (
        np.maximum(s["global"], s["region"]) + w * np.minimum(s["global"], s["region"])
    ),
}


COMPONENTS = ("global", "global raw", "region", "regions", "regions mean", "own mean", "whole")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=Path("bench/out/models"))
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--work", type=Path, default=Path("bench/out/fusion"))
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
    parser.add_argument("--misses", type=Path, default=None, help="draw composite-dev's typical box misses here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    config = ServerConfig()
    models = ModelBundle.open(args.models, config.backbone, config.engine)
    recipes = build_recipes(("gem", "dasr_star_crops"), config)
    pipeline = Pipeline(models, recipes, config.image, dasr=config.dasr)
    found = {}
    for name in args.datasets:
        dataset = Dataset.load(args.data / name)
        vectors = embed(pipeline, dataset, args.work / f"{name}.npz")
        found[name] = (dataset, vectors, similarities(vectors, no_box(dataset)))
    print(
        "| dataset | "
        + " | ".join(("global", "global raw", "region", "regions", "regions mean", "whole"))
        + " | loc@0.5 |"
    )
    print("|---|" + "---|" * (len(COMPONENTS) + 1))
    for name, (dataset, vectors, sims) in found.items():
        maps = [
            scores_map(dataset, sims[k]) for k in ("global", "global raw", "region", "regions", "regions mean", "whole")
        ]
        loc = localisation(dataset, vectors, sims["best"])
        print(f"| {name} | " + " | ".join(f"{m:.3f}" for m in maps) + f" | {'' if loc is None else f'{loc:.3f}'} |")
    for rule, fuse in RULES.items():
        print(f"\n{rule}\n\n| w | " + " | ".join(found) + " | mean |")
        print("|---|" + "---|" * (len(found) + 1))
        for w in WEIGHTS:
            maps = [scores_map(dataset, fuse(sims, w)) for dataset, _, sims in found.values()]
            print(f"| {w} | " + " | ".join(f"{m:.3f}" for m in maps) + f" | {np.mean(maps):.3f} |")
    per_query(found, SERVED, config.regions.region_set_weight)
    compaction(found, config.regions.region_set_weight, config.index.hnsw_m)
    if "composite-dev" in found:
        dataset, vectors, sims = found["composite-dev"]
        misses(dataset, vectors, sims["best"], args.misses)
        box_sweep(dataset, vectors)


if __name__ == "__main__":
    main()
