"""Search latency through a real server, as a user of `make serve` sees it (issue 28).

A real `inserve serve --recipe whole_and_regions,gem` (the Makefile's recipes) indexes holidays-dev through the
Python client; then the first 40 query photos are searched, top_k 20, with each recipe, as a whole photo and
with a box (the photo's central 60 %), the four configurations taking turns query by query so that other load
on the machine hits them alike. Parts:

1. idle: p50, p90, p99 of each configuration and its p50 against gem's;
2. while an IndexImages stream runs at full speed (holidays-dev's images again under other ids, one client
   streaming them back to back): the same, and each p50 against the idle one;
3. concurrent callers (1, 4, 16 asyncio clients, whole photos, default recipe and gem): queries per second,
   p50, p99;
4. with --video-dev: its 40 videos indexed through IndexVideo into a second server, then each of its 40 query
   photos searched top_k 1000 grouped by shot, default recipe and gem in turns.

    python bench/search_latency.py --models models --data ../shared/data [--work DIR] [--parts 1,2,3,4]

The index is kept in --work between runs (it is made once).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from inserve.clients.client import AsyncInstanceSearchClient, ImageItem, InstanceSearchClient, VideoItem
from inserve.clients.local_server import local_server

RECIPES = ("whole_and_regions", "gem")  # the Makefile's, default first
QUERIES = 40
TOP_K = 20
SHOT_TOP_K = 1000


def central_box(data: bytes) -> tuple[float, float, float, float]:
    from PIL import Image

    from inserve.clients.render import open_image

    image: Image.Image = open_image(data)
    w, h = image.size
    return (0.2 * w, 0.2 * h, 0.8 * w, 0.8 * h)


def percentiles(ms: list[float]) -> dict[str, float]:
    values = np.asarray(ms)
    return {
        "p50": float(np.percentile(values, 50)),
        "p90": float(np.percentile(values, 90)),
        "p99": float(np.percentile(values, 99)),
        "n": len(ms),
    }


def timed_searches(client: InstanceSearchClient, queries: list[bytes], configs: list[tuple], **search) -> dict:
    """Each configuration (name, recipe, box?) on every query, in turns; {name: [ms]}."""
    found: dict[str, list[float]] = {name: [] for name, _, _ in configs}
    boxes = [central_box(q) for q in queries]
    for i, query in enumerate(queries):
        order = configs if i % 2 == 0 else configs[::-1]
        for name, recipe, boxed in order:
            start = time.perf_counter()
            client.search(
                query,
                boxes[i] if boxed else None,
                search.get("top_k", TOP_K),
                recipe,
                group=search.get("group", "none"),
            )
            found[name].append(1000 * (time.perf_counter() - start))
    return found


CONFIGS = [
    ("gem, whole photo", "gem", False),
    ("gem, with a box", "gem", True),
    ("default, whole photo", "whole_and_regions", False),
    ("default, with a box", "whole_and_regions", True),
]


def table(results: dict[str, dict], against: dict[str, str], title: str) -> str:
    lines = [
        f"\n{title}\n",
        "| configuration | p50 ms | p90 ms | p99 ms | p50 / reference | p99 / own p50 |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        ref = results.get(against.get(name, ""), r) if name in against else r
        ratio = r["p50"] / ref["p50"]
        lines.append(
            f"| {name} | {r['p50']:.1f} | {r['p90']:.1f} | {r['p99']:.1f} | {ratio:.2f}x "
            f"({against.get(name, 'itself')}) | {r['p99'] / r['p50']:.2f} |"
        )
    return "\n".join(lines)


GEM_OF = {"default, whole photo": "gem, whole photo", "default, with a box": "gem, with a box"}


def part_idle(client: InstanceSearchClient, queries: list[bytes]) -> dict:
    timed_searches(client, queries[:4], CONFIGS)  # warm-up
    return {name: percentiles(ms) for name, ms in timed_searches(client, queries, CONFIGS).items()}


def part_loaded(client: InstanceSearchClient, address: str, queries: list[bytes], images: list[bytes]) -> dict:
    """Searches while another connection streams IndexImages as fast as the server takes them."""
    stop = threading.Event()
    indexed = [0]

    def stream() -> None:
        with InstanceSearchClient(address, timeout=3600, stream_timeout=3600) as writer:
            rounds = 0
            while not stop.is_set():
                items = (ImageItem(f"load-{rounds}-{i}", data) for i, data in enumerate(images) if not stop.is_set())
                for _ in writer.index_images(items):
                    indexed[0] += 1
                rounds += 1

    writer = threading.Thread(target=stream, daemon=True)
    writer.start()
    time.sleep(5)  # the stream at full speed
    start = time.perf_counter()
    found = timed_searches(client, queries, CONFIGS)
    seconds = time.perf_counter() - start
    stop.set()
    writer.join()
    result = {name: percentiles(ms) for name, ms in found.items()}
    result["_indexed_per_s"] = indexed[0] / (seconds + 5)
    return result


async def concurrent(address: str, queries: list[bytes], recipe: str, callers: int, calls: int) -> dict:
    latencies: list[float] = []
    counter = iter(range(calls))
    async with AsyncInstanceSearchClient(address, timeout=600) as client:

        async def caller(c: int) -> None:
            for i in counter:
                start = time.perf_counter()
                await client.search(queries[(c * 7 + i) % len(queries)], None, TOP_K, recipe)
                latencies.append(1000 * (time.perf_counter() - start))

        start = time.perf_counter()
        await asyncio.gather(*(caller(c) for c in range(callers)))
        seconds = time.perf_counter() - start
    return {"qps": calls / seconds, **percentiles(latencies)}


def part_concurrent(address: str, queries: list[bytes]) -> dict:
    found = {}
    for callers in (1, 4, 16):
        for recipe in ("gem", "whole_and_regions"):
            asyncio.run(concurrent(address, queries, recipe, callers, callers))  # warm-up
            found[f"{recipe}, {callers} callers"] = asyncio.run(concurrent(address, queries, recipe, callers, 40))
    return found


def part_video(models: Path, data: Path, work: Path) -> dict:
    root = data / "video-dev"
    gnd = json.loads((root / "gnd.json").read_text())
    fresh = not (work / "video" / "index.sqlite").exists()
    with (
        local_server(models, work / "video", "--recipe", ",".join(RECIPES), wait_ready=True) as server,
        InstanceSearchClient(server.address, timeout=600, stream_timeout=3600) as client,
    ):
        if fresh:
            for name in gnd["videos"]:
                list(client.index_video(VideoItem(Path(name).stem, file=root / "videos" / name)))
        queries = [(root / "images" / q["image"]).read_bytes() for q in gnd["queries"]]
        configs = [
            ("gem, top 1000 by shot", "gem", False),
            ("default, top 1000 by shot", "whole_and_regions", False),
        ]
        timed_searches(client, queries[:2], configs, top_k=SHOT_TOP_K, group="shot")
        found = timed_searches(client, queries, configs, top_k=SHOT_TOP_K, group="shot")
        stats = client.stats()
    result = {name: percentiles(ms) for name, ms in found.items()}
    result["_keyframes"] = stats.keyframes
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "inserve-search-latency")
    parser.add_argument("--parts", default="1,2,3")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    parts = {int(p) for p in args.parts.split(",")}
    holidays = args.data / "holidays-dev"
    gnd = json.loads((holidays / "gnd.json").read_text())
    images = [(holidays / "images" / name).read_bytes() for name in gnd["images"]]
    queries = [(holidays / "images" / q["image"]).read_bytes() for q in gnd["queries"][:QUERIES]]
    report: dict[str, dict] = {}
    fresh = not (args.work / "holidays" / "index.sqlite").exists()
    if parts & {1, 2, 3}:
        with (
            local_server(args.models, args.work / "holidays", "--recipe", ",".join(RECIPES), wait_ready=True) as srv,
            InstanceSearchClient(srv.address, timeout=600, stream_timeout=3600) as client,
        ):
            if fresh:
                list(client.index_images(ImageItem(n, d) for n, d in zip(gnd["images"], images)))
            print(f"holidays-dev index: {client.stats().images} images, {client.stats().regions} regions")
            if 1 in parts:
                report["idle"] = part_idle(client, queries)
                print(table(report["idle"], GEM_OF, "1. idle (holidays-dev, top_k 20; reference: gem)"))
            if 2 in parts:
                loaded = part_loaded(client, srv.address, queries, images)
                report["loaded"] = loaded
                rows = {k: v for k, v in loaded.items() if not k.startswith("_")}
                print(
                    table(
                        rows,
                        GEM_OF,
                        f"2. while IndexImages streams ({loaded['_indexed_per_s']:.1f} images/s indexed)",
                    )
                )
                if "idle" in report:
                    print("\n| configuration | p50 loaded / idle |\n|---|---|")
                    for name in rows:
                        print(f"| {name} | {rows[name]['p50'] / report['idle'][name]['p50']:.2f}x |")
            if 3 in parts:
                report["concurrent"] = part_concurrent(srv.address, queries)
                print(
                    "\n3. concurrent callers (whole photos)\n\n| recipe, callers | queries/s | p50 ms | p99 ms |"
                    "\n|---|---|---|---|"
                )
                for name, r in report["concurrent"].items():
                    print(f"| {name} | {r['qps']:.1f} | {r['p50']:.1f} | {r['p99']:.1f} |")
            # the load's images are deleted, so that the next run starts from the same index
            stored = [f"load-{r}-{i}" for r in range(20) for i in range(len(images))]
            for start in range(0, len(stored), 1000):
                client.delete(stored[start : start + 1000])
    if 4 in parts:
        report["video"] = part_video(args.models, args.data, args.work)
        rows = {k: v for k, v in report["video"].items() if not k.startswith("_")}
        print(
            table(
                rows,
                {"default, top 1000 by shot": "gem, top 1000 by shot"},
                f"4. video-dev ({report['video']['_keyframes']} keyframes), top_k 1000 grouped by shot",
            )
        )
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
