"""Default-recipe search at a million region vectors against the same search on holidays-dev alone (issue 28).

One in-process service (the default recipe, whole_and_regions) indexes holidays-dev's photos through its own
pipeline and learns its transforms; the first 40 query photos are then searched (top_k 20, as whole photos and
with the photos' central 60 % as box): network and ranking, as `Search` runs them. Then about 100,000 synthetic
images are inserted through the index's own API (InstanceIndex.add_image, one SQLite commit per image, as the
server commits): each is one of the real photos' stored rows (its regions, their boxes and scores, and its photo
vector) with every raw vector moved by Gaussian noise of the real region vectors' per-dimension spread, scaled
so that a drawn vector's cosine to its source is the median cosine of a real region vector to its nearest other
real one (tight clusters of near-duplicates around every real region), then l2-normalised. The same queries are
searched again, and the two runs are compared query by query.

    python bench/search_scale.py --models models --data ../shared/data [--images 100000]

Memory: the scoring table's bytes per region row (server/index/scoring_table.py) and the process's RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from inserve.server.config import ServerConfig
from inserve.server.evaluation import Dataset
from inserve.server.index import NewVectors
from inserve.server.index.transforms import any_vectors, learn_transforms
from inserve.server.instance_search import InstanceSearch

RECIPE = "whole_and_regions"
QUERIES = 40
TOP_K = 20


def rss_mib() -> float:
    status = Path(f"/proc/{os.getpid()}/status").read_text()
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")) / 1024


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def noise_scale(regions: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """The per-dimension noise (D,) that moves a unit region vector to the median real nearest-neighbour cosine."""
    seeds = unit(regions)
    sample = rng.choice(len(seeds), min(len(seeds), 3000), replace=False)
    similarity = seeds[sample] @ seeds.T
    similarity[np.arange(len(sample)), sample] = -1
    target = float(np.median(similarity.max(axis=1)))
    spread = seeds.std(axis=0)
    return spread * np.sqrt(max(1 / target**2 - 1, 1e-6) / float(np.sum(spread**2))), target


def timed(service: InstanceSearch, queries: list[tuple[bytes, tuple | None]]) -> list[float]:
    ms = []
    plan = service.plan(RECIPE, TOP_K)
    for data, box in queries:
        start = time.perf_counter()
        inp = service.load(data)
        service.find(plan, service.submit_query(inp, box, plan).result())
        ms.append(1000 * (time.perf_counter() - start))
    return ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    dataset = Dataset.load(args.data / "holidays-dev")
    with tempfile.TemporaryDirectory(prefix="inserve-scale-") as scratch:
        service = InstanceSearch(ServerConfig(data_dir=Path(scratch), models=args.models, recipes=(RECIPE,)))
        try:
            for start in range(0, len(dataset.images), 8):
                names = dataset.images[start : start + 8]
                inputs = [service.load(dataset.path(n).read_bytes()) for n in names]
                for name, inp, described in zip(names, inputs, service.describe(inputs)):
                    service.store(name, inp, described)
            learn_transforms(service.index, any_vectors)
            index = service.index
            rows = index.store.vectors(RECIPE, "region")
            photos = index.store.vectors(RECIPE, "global")
            photo_of = dict(zip(photos.image_ids.tolist(), photos.raw))
            images = np.unique(rows.image_ids)
            members = {int(i): np.flatnonzero(rows.image_ids == i) for i in images}
            scale, target = noise_scale(rows.raw, rng)
            queries = []
            for q in dataset.queries[:QUERIES]:
                data = dataset.path(q.image).read_bytes()
                inp = service.load(data)
                queries += [
                    (data, None),
                    (data, (0.2 * inp.width, 0.2 * inp.height, 0.8 * inp.width, 0.8 * inp.height)),
                ]
            timed(service, queries[:4])
            small = timed(service, queries)
            small_regions = len(index.space(RECIPE, "region"))

            started, before = time.perf_counter(), rss_mib()
            for n in range(args.images):
                source = int(images[n % len(images)])
                mine = members[source]
                raw = unit(unit(rows.raw[mine]) + rng.standard_normal((len(mine), rows.raw.shape[1])) * scale)
                photo = unit(unit(photo_of[source]) + rng.standard_normal(rows.raw.shape[1]) * scale)[None]
                index.add_image(
                    f"synthetic-{n}",
                    [
                        NewVectors(RECIPE, "region", raw, rows.boxes[mine], rows.scores[mine]),
                        NewVectors(RECIPE, "global", photo),
                    ],
                    width=512,
                    height=384,
                )
                if (n + 1) % 10_000 == 0:
                    print(f"  {n + 1} images, {time.perf_counter() - started:.0f} s", file=sys.stderr)
            insert_s = time.perf_counter() - started
            space = index.space(RECIPE, "region")
            large_regions = len(space)
            timed(service, queries[:4])
            large = timed(service, queries)
            memory = rss_mib() - before
            table_bytes = space.table.nbytes
        finally:
            service.close()
    report = {
        "regions": [small_regions, large_regions],
        "p50_ms": [float(np.median(small)), float(np.median(large))],
        "p90_ms": [float(np.percentile(small, 90)), float(np.percentile(large, 90))],
        "p99_ms": [float(np.percentile(small, 99)), float(np.percentile(large, 99))],
        "per_query_ratio_median": float(np.median(np.array(large) / np.array(small))),
        "insert_images_per_s": args.images / insert_s,
        "drawn_cosine": target,
        "table_bytes_per_region": table_bytes / large_regions,
        "rss_growth_mib": memory,
    }
    print(f"\nnear-duplicate cosine drawn to: {target:.3f}; inserts: {report['insert_images_per_s']:.0f} images/s")
    print("\n| index | region vectors | p50 ms | p90 ms | p99 ms |\n|---|---|---|---|---|")
    for i, name in enumerate(("holidays-dev", f"+ {args.images:,} synthetic images")):
        print(
            f"| {name} | {report['regions'][i]:,} | {report['p50_ms'][i]:.1f} | {report['p90_ms'][i]:.1f} | "
            f"{report['p99_ms'][i]:.1f} |"
        )
    print(
        f"\np50 ratio {report['p50_ms'][1] / report['p50_ms'][0]:.2f}x (per query, median "
        f"{report['per_query_ratio_median']:.2f}x); scoring table {report['table_bytes_per_region']:.0f} B per "
        f"region; RSS +{memory:.0f} MiB for the synthetic images"
    )
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
