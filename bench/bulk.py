"""Indexing throughput: a folder through a real server (`inserve index`'s IndexImages stream) against
`inserve bulk-index` on a local Ray with one and with two describing workers, the same images, the same
recipe, a fresh data directory each, one after the other in one run.

    python bench/bulk.py --models bench/out/models --images ../shared/data/holidays-dev/images [--recipe gem]

Prints images per second and the ratio to the server's.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from inserve.clients.client import ImageItem, InstanceSearchClient
from inserve.clients.local_server import local_server
from inserve.clients.remote_commands import image_files
from inserve.server.bulk_index import bulk_index
from inserve.server.config import ServerConfig


def through_server(models: Path, files: list[tuple[str, Path]], recipe: str) -> float:
    with (
        tempfile.TemporaryDirectory() as data_dir,
        local_server(models, Path(data_dir), "--recipe", recipe, wait_ready=True) as server,
        InstanceSearchClient(server.address, timeout=600) as client,
    ):
        start = time.perf_counter()
        acks = sum(1 for _ in client.index_images(ImageItem.from_path(p, name) for name, p in files))
        seconds = time.perf_counter() - start
    assert acks == len(files)
    return seconds


def on_ray(models: Path, files: list[tuple[str, Path]], recipe: str, workers: int) -> float:
    with tempfile.TemporaryDirectory() as data_dir:
        config = ServerConfig(data_dir=Path(data_dir), models=models, recipes=(recipe,))
        start = time.perf_counter()
        result = bulk_index(config, files, workers=workers)
        seconds = time.perf_counter() - start
    assert result.indexed == len(files), result.failed
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=Path("bench/out/models"))
    parser.add_argument("--images", type=Path, default=Path("../shared/data/holidays-dev/images"))
    parser.add_argument("--recipe", default=ServerConfig.recipes[0])
    parser.add_argument("--limit", type=int, default=0, help="index only the first N images (0 = all)")
    args = parser.parse_args()
    import ray

    files = list(image_files([args.images]))[: args.limit or None]
    ray.init(include_dashboard=False, log_to_driver=False)
    cpus = int(ray.available_resources().get("CPU", 1))
    runs = {"server (IndexImages stream)": through_server(args.models, files, args.recipe)}
    for workers in sorted({1, cpus}):
        runs[f"bulk-index, Ray, {workers} worker{'s' * (workers > 1)}"] = on_ray(
            args.models, files, args.recipe, workers
        )
    ray.shutdown()
    server = runs["server (IndexImages stream)"]
    print(f"\n{len(files)} images of {args.images}, recipe {args.recipe}, {cpus} CPUs\n")
    print("| path | seconds | images/s | / server |")
    print("|---|---|---|---|")
    for name, seconds in runs.items():
        print(f"| {name} | {seconds:.1f} | {len(files) / seconds:.2f} | {server / seconds:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
