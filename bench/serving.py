"""Serving benchmark: IndexImages and Search over real gRPC on loopback, dynamic batching on and off.

For each server configuration (max_batch 1, and the server's default batching, plus any --config given) a
real `inserve serve` process is started; N concurrent asyncio clients (N = 1, 4, 8, 16) each send one image
per call, IndexImages then Search, and every call's latency is recorded. The configurations take turns (in
reversed order every other round) so that other load on the machine hits them alike; the table gives medians
over rounds and each configuration's throughput relative to the first. From the servers' batcher log it also
gives the mean batch size and how busy the batch runner was (near 100 %: the networks bound throughput, and
batching can only help when the per-image cost of a batch is lower, which the backbone table below
measures). A last part indexes each video of a folder through IndexVideo: keyframes/s.

    python bench/serving.py --models /tmp/models --images /work/shared/data/holidays-dev/images \
        --videos /work/shared/data/videos
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import sys
import tempfile
import time
from contextlib import AbstractContextManager, ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from inserve.clients.client import AsyncInstanceSearchClient, ImageItem, InstanceSearchClient, VideoItem
from inserve.clients.local_server import LocalServer, local_server

BATCH_LINE = re.compile(r"batch of (\d+) ran in ([\d.]+) ms")


@dataclass(frozen=True)
class Measure:
    config: str
    op: str
    clients: int
    round: int
    images: int
    seconds: float
    p50_ms: float
    p99_ms: float
    mean_batch: float  # images per network run
    busy: float  # fraction of the wall time the batch runner was running the networks

    @property
    def throughput(self) -> float:
        return self.images / self.seconds


def server(models: Path, data_dir: Path, flags: list[str]) -> AbstractContextManager[LocalServer]:
    """A real server logging every batch (DEBUG), ready to answer."""
    return local_server(models, data_dir, *flags, global_flags=("--log-level", "DEBUG"), wait_ready=True)


async def run_clients(address: str, op: str, images: list[bytes], clients: int, calls: int, tag: str) -> tuple:
    """`clients` concurrent callers making `calls` calls in all; (wall seconds, latencies in seconds)."""
    latencies: list[float] = []
    counter = iter(range(calls))
    async with AsyncInstanceSearchClient(address, timeout=600) as client:

        async def caller(c: int) -> None:
            for i in counter:
                image = images[(c * 7919 + i) % len(images)]
                start = time.perf_counter()
                if op == "index":
                    async for _ in client.index_images([ImageItem(f"{tag}-{i}", image)]):
                        pass
                else:
                    await client.search(image, top_k=10)
                latencies.append(time.perf_counter() - start)

        start = time.perf_counter()
        await asyncio.gather(*(caller(c) for c in range(clients)))
        return time.perf_counter() - start, latencies


def batches(log: list[str], since: int) -> list[tuple[int, float]]:
    """(images, run ms) of every batch logged after line `since`."""
    return [(int(m.group(1)), float(m.group(2))) for line in log[since:] if (m := BATCH_LINE.search(line))]


def measure(srv: LocalServer, config: str, op: str, images: list[bytes], clients: int, calls: int, rnd: int) -> Measure:
    asyncio.run(
        run_clients(srv.address, op, images, clients, min(calls, 2 * clients), f"warm-{config}-{clients}-{rnd}")
    )
    time.sleep(0.2)  # the warm-up's batch lines are in the log
    since = len(srv.output)
    seconds, latencies = asyncio.run(run_clients(srv.address, op, images, clients, calls, f"{config}-{clients}-{rnd}"))
    time.sleep(0.2)
    ran = batches(srv.output, since)
    ms = np.array(latencies) * 1000
    return Measure(
        config,
        op,
        clients,
        rnd,
        calls,
        seconds,
        float(np.percentile(ms, 50)),
        float(np.percentile(ms, 99)),
        sum(n for n, _ in ran) / max(1, len(ran)),
        min(1.0, sum(t for _, t in ran) / 1000 / seconds),
    )


def video_rate(address: str, videos: list[Path]) -> list[dict]:
    rows = []
    with InstanceSearchClient(address, timeout=3600) as client:
        for path in videos:
            start = time.perf_counter()
            *_, last = client.index_video(VideoItem(path.name, file=path))
            seconds = time.perf_counter() - start
            rows.append(
                {
                    "video": path.name,
                    "frames": last.frames_decoded,
                    "keyframes": last.keyframes_indexed,
                    "regions": last.regions,
                    "seconds": seconds,
                    "keyframes_per_s": last.keyframes_indexed / seconds,
                    "frames_per_s": last.frames_decoded / seconds,
                }
            )
    return rows


def backbone_cost(models: Path, backbone: str, long_side: int, reps: int = 5) -> dict[str, dict[int, float]]:
    """What bounds batching on this machine: the backbone's wall ms per image at batch sizes 1..8 (4:3 input
    at the long side), with one intra-op thread and with the runtime's default; sizes interleaved, medians."""
    from inserve.engines import EngineOptions
    from inserve.server.models import ModelBundle

    height = long_side * 3 // 4 // 32 * 32
    rng = np.random.default_rng(0)
    inputs = {b: rng.uniform(0, 255, (b, 3, height, long_side)).astype(np.float32) for b in (1, 2, 4, 8)}
    cost = {}
    for name, threads in (("1 thread", 1), ("default threads", 0)):
        bundle = ModelBundle.open(models, backbone, EngineOptions(device="cpu", intra_op_threads=threads))
        for pixels in inputs.values():
            bundle.features(pixels)
        per_image: dict[int, list[float]] = {b: [] for b in inputs}
        for _ in range(reps):
            for b, pixels in inputs.items():
                start = time.perf_counter()
                for _ in range(8 // b):
                    bundle.features(pixels)
                per_image[b].append((time.perf_counter() - start) / 8 * 1000)
        cost[name] = {b: statistics.median(v) for b, v in per_image.items()}
    return cost


def table(measures: list[Measure], configs: list[str]) -> str:
    head = " | ".join(f"{c} img/s | p50 ms | p99 ms | batch | busy" for c in configs)
    ratios = [f"{c} / {configs[0]}" for c in configs[1:]]
    lines = [
        f"| op | clients | {head} | " + " | ".join(ratios) + " |",
        "| --- | --- |" + " --- |" * (5 * len(configs) + len(ratios)),
    ]
    for op in ("index", "search"):
        for clients in sorted({m.clients for m in measures}):
            cells, rates = [], []
            for config in configs:
                ms = [m for m in measures if (m.op, m.clients, m.config) == (op, clients, config)]
                rates.append(statistics.median(m.throughput for m in ms))
                p50 = statistics.median(m.p50_ms for m in ms)
                p99 = statistics.median(m.p99_ms for m in ms)
                size = statistics.median(m.mean_batch for m in ms)
                busy = statistics.median(m.busy for m in ms)
                cells.append(f"{rates[-1]:.1f} | {p50:.0f} | {p99:.0f} | {size:.1f} | {100 * busy:.0f} %")
            ratio = " | ".join(f"{rate / rates[0]:.2f}x" for rate in rates[1:])
            lines.append(f"| {op} | {clients} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, required=True)
    parser.add_argument("--images", type=Path, required=True, help="a folder of JPEG photos")
    parser.add_argument("--videos", type=Path, default=None, help="a folder of videos for keyframes/s")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--recipe", default="gem", help="recipe the image servers index with")
    parser.add_argument("--video-recipes", default="gem,dasr_star", help="one video server per recipe")
    parser.add_argument("--clients", default="1,4,8,16")
    parser.add_argument("--calls", type=int, default=48, help="calls per measurement (after a short warm-up)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--long-side", type=int, default=512)
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="NAME=FLAGS",
        help="another server configuration, e.g. 'default, 1 thread=--threads 1' (repeatable)",
    )
    parser.add_argument("--no-backbone", action="store_true", help="skip the backbone-alone table")
    parser.add_argument("--out", type=Path, default=Path("bench/out/serving.json"))
    args = parser.parse_args()

    images = [p.read_bytes() for p in sorted(args.images.glob("*.jpg"))[:200]]
    clients = [int(c) for c in args.clients.split(",")]
    common = ["--backbone", args.backbone, "--long-side", str(args.long_side), "--queue-depth", "256"]
    configs = {"max_batch 1": ["--max-batch", "1"], "default": []}  # default: BatcherConfig as it ships
    for spec in args.config:
        name, _, flags = spec.partition("=")
        configs[name.strip()] = flags.split()
    started, load = time.perf_counter(), [os.getloadavg()[0]]
    measures: list[Measure] = []
    with tempfile.TemporaryDirectory(prefix="inserve-bench-") as scratch, ExitStack() as servers:
        # every configuration's server is up at once (an idle one costs nothing) and the measurements
        # alternate between them, so that load from elsewhere on the machine falls on all alike
        running = {
            config: servers.enter_context(
                server(args.models, Path(scratch) / str(i), [*common, "--recipe", args.recipe, *flags])
            )
            for i, (config, flags) in enumerate(configs.items())
        }
        for rnd in range(args.rounds):
            for op in ("index", "search"):
                for n in clients:
                    order = list(running.items())
                    for config, srv in order[:: 1 if rnd % 2 == 0 else -1]:  # neither always goes first
                        m = measure(srv, config, op, images, n, args.calls, rnd)
                        measures.append(m)
                        load.append(os.getloadavg()[0])
                        print(
                            f"round {rnd} {config:12s} {op:6s} {n:2d} clients: {m.throughput:6.1f} img/s "
                            f"p50 {m.p50_ms:6.0f} ms p99 {m.p99_ms:6.0f} ms batch {m.mean_batch:.1f} "
                            f"busy {100 * m.busy:.0f} %",
                            file=sys.stderr,
                        )
        servers.close()
        videos = []
        if args.videos is not None:
            for recipe in args.video_recipes.split(","):
                with server(args.models, Path(scratch) / f"video-{recipe}", [*common, "--recipe", recipe]) as srv:
                    videos += [
                        {"recipe": recipe, **row} for row in video_rate(srv.address, sorted(args.videos.glob("*.mp4")))
                    ]
    cost = {} if args.no_backbone else backbone_cost(args.models, args.backbone, args.long_side)
    what = f"{args.recipe}, {args.backbone}, long side {args.long_side}"
    print(f"\nIndexImages and Search ({what}), medians of {args.rounds} rounds of {args.calls} calls:\n")
    print(table(measures, list(configs)))
    if cost:
        print(f"\nBackbone alone ({args.backbone}, {args.long_side} px 4:3 input), wall ms per image:\n")
        print("| batch | " + " | ".join(cost) + " |")
        print("| --- |" + " --- |" * len(cost))
        for b in next(iter(cost.values())):
            print(f"| {b} | " + " | ".join(f"{per_image[b]:.1f}" for per_image in cost.values()) + " |")
    if videos:
        print("\nIndexVideo (default batching, default keyframe rules, whole upload to final commit):\n")
        print("| video | recipe | frames | keyframes | regions | seconds | keyframes/s | frames/s |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for v in videos:
            print(
                f"| {v['video']} | {v['recipe']} | {v['frames']} | {v['keyframes']} | {v['regions']} "
                f"| {v['seconds']:.1f} | {v['keyframes_per_s']:.2f} | {v['frames_per_s']:.1f} |"
            )
    print(
        f"\n({time.perf_counter() - started:.0f} s in all; {os.cpu_count()} CPUs, 1-minute load average "
        f"{min(load):.1f}-{max(load):.1f} during the image part, other processes included)"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "load_average": load,
        "configs": configs,
        "measures": [asdict(m) for m in measures],
        "videos": videos,
        "backbone_cost": cost,
    }
    args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
