"""Through the service, one store: indexing throughput and search latency of one inserve server on its own data
directory (the embedded default), of one replica on a Milvus store, and of two replicas sharing it (a
`milvus-lite server` process on this machine), side by side in one run.

    python bench/replicas.py --models bench/out/models --images ../shared/data/holidays-dev/images \\
        [--limit 120] [--queries 60] [--recipe whole_and_regions]

Indexing: the images split over the replicas, one IndexImages stream per replica at once. Search: the first
`--queries` images as whole-image queries, one at a time, through one client balancing over the replicas
(round_robin), after everything is indexed. Each variant starts from an empty store.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from inserve.clients.client import ImageItem, InstanceSearchClient
from inserve.clients.local_server import free_port, local_server, milvus_lite_server
from inserve.clients.remote_commands import image_files
from inserve.server.config import ServerConfig


def run(models: Path, files: list[tuple[str, Path]], recipe: str, queries: int, replicas: int, milvus: bool) -> dict:
    with ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        flags = ["--recipe", recipe]
        if milvus:
            port = free_port()
            stack.enter_context(milvus_lite_server(scratch / "milvus", port))
            flags += ["--store", f"milvus://127.0.0.1:{port}"]
        servers = [
            stack.enter_context(local_server(models, scratch / f"data{i}", *flags, wait_ready=True))
            for i in range(replicas)
        ]
        clients = [stack.enter_context(InstanceSearchClient(s.address, timeout=600)) for s in servers]
        shares = [files[i::replicas] for i in range(replicas)]
        acked = [0] * replicas

        def index(i: int) -> None:
            acked[i] = sum(1 for _ in clients[i].index_images(ImageItem.from_path(p, name) for name, p in shares[i]))

        start = time.perf_counter()
        threads = [threading.Thread(target=index, args=(i,)) for i in range(replicas)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        index_s = time.perf_counter() - start
        assert sum(acked) == len(files), acked
        balanced = stack.enter_context(
            InstanceSearchClient("ipv4:" + ",".join(s.address for s in servers), timeout=600)
        )
        ms, top1 = [], 0
        for name, path in files[:queries]:
            began = time.perf_counter()
            hits = balanced.search(path.read_bytes(), top_k=20)
            ms.append(1000 * (time.perf_counter() - began))
            top1 += bool(hits) and hits[0].id == name
    return {
        "images_per_s": len(files) / index_s,
        "p50_ms": statistics.median(ms),
        "p99_ms": float(np.percentile(ms, 99)),
        "top1": top1 / len(ms),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=Path("bench/out/models"))
    parser.add_argument("--images", type=Path, default=Path("../shared/data/holidays-dev/images"))
    parser.add_argument("--recipe", default=ServerConfig.recipes[0])
    parser.add_argument("--limit", type=int, default=120, help="images indexed")
    parser.add_argument("--queries", type=int, default=60)
    args = parser.parse_args()
    files = list(image_files([args.images]))[: args.limit]
    variants = {
        "one server, data directory (hnswlib + SQLite)": (1, False),
        "one replica, Milvus (milvus-lite server)": (1, True),
        "two replicas, one Milvus (milvus-lite server)": (2, True),
    }
    results = {}
    for name, (replicas, milvus) in variants.items():
        results[name] = run(args.models, files, args.recipe, args.queries, replicas, milvus)
        print(name, results[name], file=sys.stderr)
    base = results[next(iter(variants))]
    print(f"\n{len(files)} images of {args.images}, recipe {args.recipe}, {args.queries} whole-image queries\n")
    print("| store | images/s | / embedded | search p50 ms | p99 ms | / embedded p50 | top-1 is the query |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['images_per_s']:.2f} | {r['images_per_s'] / base['images_per_s']:.2f} | "
            f"{r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['p50_ms'] / base['p50_ms']:.2f} | {r['top1']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
