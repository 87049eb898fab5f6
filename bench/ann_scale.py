"""One million region vectors: recall@10 against exact search, query latency, insert rate and memory per
vector, for hnswlib as inserve configures it (and with other ef) and for Milvus (milvus-lite), side by side.

The vectors are what the default recipe stores in its region graph: whole_and_regions' region descriptors,
PCA-reduced to IndexConfig.compact_dims (384) and l2-normalised. Real ones come from describing the images of
shared/data (holidays-dev, ukbench-dev, composite-dev) through the server's own pipeline; the reduction is
learned on them (server/stages/whitening.py pca_reduce, as the index learns it). The million are drawn around
them: each is a real vector plus Gaussian noise with the real vectors' per-dimension spread, scaled so that a
drawn vector's cosine to its seed equals the median cosine of a real vector to its nearest real neighbour
(clusters as tight as real near-duplicate regions, as many clusters as real regions), then l2-normalised.
Queries are 1,000 more drawn the same way (none of them indexed). Exact top-10 by brute force (numpy).

    python bench/ann_scale.py --models bench/out/models [--vectors 1000000] [--milvus]

Latency is per single query on one thread (hnswlib set_num_threads(1)); inserts use every core. With --milvus
the same vectors go into milvus-lite with an HNSW index of the same parameters (pip install pymilvus
milvus-lite), and the first --milvus-queries of the queries are asked of it: its search time grows with the
collection (bench/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import hnswlib
import numpy as np

from inserve.server.config import IndexConfig, ServerConfig
from inserve.server.instance_search import InstanceSearch
from inserve.server.stages.whitening import pca_reduce

RECIPE = "whole_and_regions"
K = 10


def real_region_vectors(models: Path, data: Path, images: int) -> np.ndarray:
    """Raw region vectors of the default recipe from up to `images` photos of each dev set."""
    files = [
        f
        for name in ("holidays-dev", "ukbench-dev", "composite-dev")
        for f in sorted((data / name / "images").iterdir())[:images]
    ]
    with tempfile.TemporaryDirectory() as scratch:
        core = InstanceSearch(ServerConfig(data_dir=Path(scratch), models=models, recipes=(RECIPE,)))
        try:
            raw = []
            for start in range(0, len(files), 8):
                inputs = [core.load(f.read_bytes()) for f in files[start : start + 8]]
                for described in core.describe(inputs):
                    raw += [v.raw for v in described[RECIPE].vectors if v.kind == "region"]
        finally:
            core.close()
    return np.concatenate(raw).astype(np.float32)


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def exact_top(database: np.ndarray, queries: np.ndarray, k: int = K, chunk: int = 100_000) -> np.ndarray:
    """Indices (Q, k) of the k largest inner products, by brute force in chunks of the database."""
    best_scores = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_ids = np.zeros((len(queries), 0), dtype=np.int64)
    for start in range(0, len(database), chunk):
        scores = queries @ database[start : start + chunk].T
        top = np.argpartition(-scores, k, axis=1)[:, :k]
        best_scores = np.concatenate([best_scores, np.take_along_axis(scores, top, 1)], axis=1)
        best_ids = np.concatenate([best_ids, top + start], axis=1)
        keep = np.argsort(-best_scores, axis=1)[:, :k]
        best_scores, best_ids = np.take_along_axis(best_scores, keep, 1), np.take_along_axis(best_ids, keep, 1)
    return best_ids


def drawn(seeds: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """n vectors around randomly chosen seeds, as tight as real nearest neighbours (module docstring), and the
    median nearest-neighbour cosine they are drawn to."""
    sample = rng.choice(len(seeds), min(len(seeds), 4000), replace=False)
    similarity = seeds[sample] @ seeds.T
    similarity[np.arange(len(sample)), sample] = -1  # not itself
    target = float(np.median(similarity.max(axis=1)))
    spread = seeds.std(axis=0)
    # E|noise|^2 = s^2 * sum(spread^2); cos(seed + noise, seed) ~ 1 / sqrt(1 + s^2 sum(spread^2)) for unit seeds
    scale = np.sqrt(max(1 / target**2 - 1, 1e-6) / float(np.sum(spread**2)))
    out = np.empty((n, seeds.shape[1]), dtype=np.float32)
    for start in range(0, n, 100_000):
        count = min(100_000, n - start)
        centres = seeds[rng.integers(0, len(seeds), count)]
        noise = rng.standard_normal((count, seeds.shape[1])).astype(np.float32) * (scale * spread)
        out[start : start + count] = unit(centres + noise)
    return out, target


def rss_mib() -> float:
    status = Path(f"/proc/{os.getpid()}/status").read_text()
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")) / 1024


def timed_queries(search, queries: np.ndarray) -> tuple[np.ndarray, list[float]]:
    found, ms = [], []
    for query in queries:
        start = time.perf_counter()
        found.append(search(query))
        ms.append(1000 * (time.perf_counter() - start))
    return np.asarray(found), ms


def row_line(r: dict, raw_bytes: int) -> str:
    return (
        f"| {r['engine']} | {r['setting']} | {r['recall@10']:.3f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
        f"{r['insert_per_s']:.0f} | {r['bytes_per_vector']:.0f} | {r['bytes_per_vector'] / raw_bytes:.2f} |"
    )


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / K for f, t in zip(found, truth)]))


def run_hnswlib(
    database: np.ndarray, queries: np.ndarray, truth: np.ndarray, config: IndexConfig, efs: list[int]
) -> list[dict]:
    before = rss_mib()
    graph = hnswlib.Index(space="ip", dim=database.shape[1])
    graph.init_index(max_elements=len(database), M=config.hnsw_m, ef_construction=config.ef_construction)
    graph.set_num_threads(os.cpu_count() or 1)
    start = time.perf_counter()
    for chunk in range(0, len(database), 50_000):
        graph.add_items(database[chunk : chunk + 50_000], np.arange(chunk, min(chunk + 50_000, len(database))))
        print(
            f"  hnswlib: {min(chunk + 50_000, len(database))} vectors, {time.perf_counter() - start:.0f} s",
            file=sys.stderr,
        )
    insert_s = time.perf_counter() - start
    memory = rss_mib() - before
    with tempfile.TemporaryDirectory() as scratch:
        graph.save_index(f"{scratch}/graph.bin")
        file_bytes = os.path.getsize(f"{scratch}/graph.bin")
    graph.set_num_threads(1)
    rows = []
    for ef in efs:
        graph.set_ef(ef)
        found, ms = timed_queries(lambda q: graph.knn_query(q, k=K)[0][0], queries)
        rows.append(
            {
                "engine": "hnswlib",
                "setting": f"M {config.hnsw_m}, ef_construction {config.ef_construction}, ef {ef}"
                + (" (inserve's)" if ef == config.ef_search else ""),
                "recall@10": recall(found, truth),
                "p50_ms": statistics.median(ms),
                "p99_ms": float(np.percentile(ms, 99)),
                "insert_per_s": len(database) / insert_s,
                "bytes_per_vector": file_bytes / len(database),
                "rss_mib": memory,
            }
        )
    return rows


def run_milvus(
    database: np.ndarray, queries: np.ndarray, truth: np.ndarray, config: IndexConfig, efs: list[int]
) -> list[dict]:
    from pymilvus import DataType, MilvusClient

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        client = MilvusClient(f"{scratch}/milvus.db")
        schema = client.create_schema(auto_id=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=database.shape[1])
        index = client.prepare_index_params()
        index.add_index(
            "vector",
            index_type="HNSW",
            metric_type="IP",
            params={"M": config.hnsw_m, "efConstruction": config.ef_construction},
        )
        client.create_collection("regions", schema=schema, index_params=index)
        start = time.perf_counter()
        for chunk in range(0, len(database), 10_000):
            part = database[chunk : chunk + 10_000]
            client.insert("regions", [{"id": chunk + i, "vector": v} for i, v in enumerate(part.tolist())])
            if chunk % 100_000 == 0:
                print(
                    f"  milvus-lite: {chunk + len(part)} vectors, {time.perf_counter() - start:.0f} s", file=sys.stderr
                )
        client.flush("regions")
        client.load_collection("regions")
        insert_s = time.perf_counter() - start
        described = client.describe_index("regions", "vector")
        disk = sum(f.stat().st_size for f in Path(scratch).rglob("*") if f.is_file())
        for ef in efs:

            def search(q: np.ndarray, ef: int = ef) -> list[int]:
                hits = client.search("regions", [q.tolist()], limit=K, search_params={"params": {"ef": ef}})
                return [hit["id"] for hit in hits[0]]

            found, ms = timed_queries(search, queries)
            rows.append(
                {
                    "engine": "milvus-lite",
                    "setting": f"{described.get('index_type')} ef {ef}, {len(queries)} queries",
                    "recall@10": recall(found, truth),
                    "p50_ms": statistics.median(ms),
                    "p99_ms": float(np.percentile(ms, 99)),
                    "insert_per_s": len(database) / insert_s,
                    "bytes_per_vector": disk / len(database),
                    "rss_mib": float("nan"),
                }
            )
        client.close()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=Path("bench/out/models"))
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--images", type=int, default=100, help="photos described per dev set")
    parser.add_argument("--vectors", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--efs", default="16,32,64,128,256")
    parser.add_argument("--milvus", action="store_true", help="also milvus-lite (pip install pymilvus milvus-lite)")
    parser.add_argument(
        "--milvus-queries", type=int, default=200, help="of the queries, how many milvus-lite answers (it is slow)"
    )
    parser.add_argument("--json", type=Path, default=Path("bench/out/ann_scale.json"))
    args = parser.parse_args()
    config = IndexConfig()
    efs = [int(e) for e in args.efs.split(",")]
    raw = real_region_vectors(args.models, args.data, args.images)
    reduced = unit(pca_reduce(raw, config.compact_dims).apply(raw))
    rng = np.random.default_rng(0)
    database, target = drawn(reduced, args.vectors, rng)
    queries, _ = drawn(reduced, args.queries, rng)
    print(
        f"{len(raw)} real region vectors ({raw.shape[1]} dims) -> {reduced.shape[1]} dims; drawn: {len(database)}, "
        f"cosine to seed {target:.3f}",
        file=sys.stderr,
    )
    start = time.perf_counter()
    truth = exact_top(database, queries)
    exact_ms = 1000 * (time.perf_counter() - start) / len(queries)
    raw_bytes = database.shape[1] * 4
    rows = run_hnswlib(database, queries, truth, config, efs)
    for r in rows:
        print(row_line(r, raw_bytes), file=sys.stderr)
    if args.milvus:
        asked = args.milvus_queries
        rows += run_milvus(database, queries[:asked], truth[:asked], config, efs[-1:])
        print(row_line(rows[-1], raw_bytes), file=sys.stderr)
    print(
        f"\n{len(database):,} vectors x {database.shape[1]} dims ({raw_bytes} bytes raw each), {len(queries)} queries; "
        f"exact search (numpy, all cores): {exact_ms:.0f} ms a query\n"
    )
    print("| engine | setting | recall@10 | p50 ms | p99 ms | inserts/s | bytes/vector | / raw |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(row_line(r, raw_bytes))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps({"real_vectors": len(raw), "seed_cosine": target, "exact_ms": exact_ms, "rows": rows}, indent=1)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
