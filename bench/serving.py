"""Serving benchmark: IndexImages and Search over real gRPC on loopback, dynamic batching on and off.

For each server configuration (max_batch 1, and the default batching) a real `inserve serve` process is
started; N concurrent asyncio clients (N = 1, 4, 8, 16) each send one image per call, IndexImages then
Search, and every call's latency is recorded. The configurations alternate for several rounds so that
other load on the machine hits both alike; the table gives medians over rounds and the throughput
ratio of the default batching to max_batch 1. A last part indexes the videos of a folder through
IndexVideo and reports keyframes/s.

    python bench/serving.py --models /tmp/models --images /work/shared/data/holidays-dev/images \
        --videos /work/shared/data/videos
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from inserve.clients.client import AsyncInstanceSearchClient, ImageItem, InstanceSearchClient, VideoItem


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

    @property
    def throughput(self) -> float:
        return self.images / self.seconds


@contextmanager
def server(models: Path, data_dir: Path, flags: list[str]) -> Iterator[str]:
    command = [sys.executable, "-m", "inserve.clients.cli", "serve", "--port", "0", "--host", "127.0.0.1"]
    command += ["--models", str(models), "--data-dir", str(data_dir), *flags]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        address = None
        for line in process.stdout:
            found = re.search(r"listening on port (\d+)", line)
            if found:
                address = f"127.0.0.1:{found.group(1)}"
                break
        if address is None:
            raise RuntimeError("the server did not start")
        threading.Thread(target=lambda: process.stdout.read(), daemon=True).start()
        with InstanceSearchClient(address) as client:
            client.wait_ready()
        yield address
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(120)


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


def measure(address: str, config: str, op: str, images: list[bytes], clients: int, calls: int, rnd: int) -> Measure:
    asyncio.run(run_clients(address, op, images, clients, min(calls, 2 * clients), f"warm-{config}-{clients}-{rnd}"))
    seconds, latencies = asyncio.run(run_clients(address, op, images, clients, calls, f"{config}-{clients}-{rnd}"))
    ms = np.array(latencies) * 1000
    return Measure(config, op, clients, rnd, calls, seconds, float(np.percentile(ms, 50)), float(np.percentile(ms, 99)))


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


def backbone_cost(models: Path, backbone: str, long_side: int, reps: int = 3) -> dict[int, tuple[float, float]]:
    """What bounds batching on this machine: the backbone's process CPU ms and wall ms per image at batch
    sizes 1..8 (4:3 input at the long side, one intra-op thread so other load does not hide the cost)."""
    from inserve.engines import EngineOptions
    from inserve.server.models import ModelBundle

    bundle = ModelBundle.open(models, backbone, EngineOptions(device="cpu", intra_op_threads=1))
    height = long_side * 3 // 4 // 32 * 32
    rng = np.random.default_rng(0)
    batches = {b: rng.uniform(0, 255, (b, 3, height, long_side)).astype(np.float32) for b in (1, 2, 4, 8)}
    cpu: dict[int, list[float]] = {b: [] for b in batches}
    wall: dict[int, list[float]] = {b: [] for b in batches}
    for pixels in batches.values():
        bundle.features(pixels)
    for _ in range(reps):
        for b, pixels in batches.items():
            start_cpu, start = time.process_time(), time.perf_counter()
            for _ in range(8 // b):
                bundle.features(pixels)
            cpu[b].append((time.process_time() - start_cpu) / 8 * 1000)
            wall[b].append((time.perf_counter() - start) / 8 * 1000)
    return {b: (statistics.median(cpu[b]), statistics.median(wall[b])) for b in batches}


def table(measures: list[Measure], configs: list[str]) -> str:
    lines = [
        "| op | clients | " + " | ".join(f"{c} img/s | {c} p50 ms | {c} p99 ms" for c in configs) + " | ratio |",
        "| --- | --- | " + " | ".join("--- | --- | ---" for _ in configs) + " | --- |",
    ]
    for op in ("index", "search"):
        for clients in sorted({m.clients for m in measures}):
            cells, rates = [], []
            for config in configs:
                ms = [m for m in measures if (m.op, m.clients, m.config) == (op, clients, config)]
                rate = statistics.median(m.throughput for m in ms)
                rates.append(rate)
                p50 = statistics.median(m.p50_ms for m in ms)
                p99 = statistics.median(m.p99_ms for m in ms)
                cells.append(f"{rate:.1f} | {p50:.0f} | {p99:.0f}")
            lines.append(f"| {op} | {clients} | " + " | ".join(cells) + f" | {rates[-1] / rates[0]:.2f}x |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, required=True)
    parser.add_argument("--images", type=Path, required=True, help="a folder of JPEG photos")
    parser.add_argument("--videos", type=Path, default=None, help="a folder of videos for keyframes/s")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--recipe", default="gem", help="recipe the servers index with")
    parser.add_argument("--video-recipe", default="dasr_star", help="recipe for the video part")
    parser.add_argument("--clients", default="1,4,8,16")
    parser.add_argument("--calls", type=int, default=64, help="calls per measurement (after a short warm-up)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-batch", type=int, default=8, help="the default batching's max_batch")
    parser.add_argument("--max-delay-ms", type=float, default=5.0)
    parser.add_argument("--long-side", type=int, default=512)
    parser.add_argument("--out", type=Path, default=Path("bench/out/serving.json"))
    args = parser.parse_args()

    images = [p.read_bytes() for p in sorted(args.images.glob("*.jpg"))[:200]]
    clients = [int(c) for c in args.clients.split(",")]
    common = ["--backbone", args.backbone, "--recipe", args.recipe, "--long-side", str(args.long_side)]
    common += ["--queue-depth", "256"]
    configs = {
        "max_batch 1": [*common, "--max-batch", "1"],
        f"max_batch {args.max_batch}": [
            *common,
            "--max-batch",
            str(args.max_batch),
            "--max-delay-ms",
            str(args.max_delay_ms),
        ],
    }
    measures: list[Measure] = []
    with tempfile.TemporaryDirectory(prefix="inserve-bench-") as scratch, ExitStack() as servers:
        # every configuration's server is up at once (an idle one costs nothing) and the measurements
        # alternate between them, so that load from elsewhere on the machine falls on both alike
        addresses = {
            config: servers.enter_context(server(args.models, Path(scratch) / str(i), flags))
            for i, (config, flags) in enumerate(configs.items())
        }
        for rnd in range(args.rounds):
            for op in ("index", "search"):
                for n in clients:
                    for config, address in addresses.items():
                        m = measure(address, config, op, images, n, args.calls, rnd)
                        measures.append(m)
                        print(
                            f"round {rnd} {config:12s} {op:6s} {n:2d} clients: {m.throughput:6.1f} img/s "
                            f"p50 {m.p50_ms:6.0f} ms p99 {m.p99_ms:6.0f} ms",
                            file=sys.stderr,
                        )
        videos = []
        if args.videos is not None:
            flags = ["--backbone", args.backbone, "--recipe", args.video_recipe, "--long-side", str(args.long_side)]
            with server(args.models, Path(scratch) / "video", flags) as address:
                videos = video_rate(address, sorted(args.videos.glob("*.mp4")))
    for v in videos:
        v["recipe"] = args.video_recipe
    cost = backbone_cost(args.models, args.backbone, args.long_side)
    print(table(measures, list(configs)))
    print(f"\nBackbone alone ({args.backbone}, {args.long_side} px long side, 1 thread), per image:\n")
    print("| batch | CPU ms | wall ms |")
    print("| --- | --- | --- |")
    for b, (cpu_ms, wall_ms) in cost.items():
        print(f"| {b} | {cpu_ms:.1f} | {wall_ms:.1f} |")
    if videos:
        print(f"\nIndexVideo ({args.video_recipe}, default batching, default keyframe rules):\n")
        print("| video | frames | keyframes | regions | seconds | keyframes/s | frames/s |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for v in videos:
            print(
                f"| {v['video']} | {v['frames']} | {v['keyframes']} | {v['regions']} | {v['seconds']:.1f} "
                f"| {v['keyframes_per_s']:.2f} | {v['frames_per_s']:.1f} |"
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"measures": [asdict(m) for m in measures], "videos": videos, "backbone_cost": cost}
    args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
