"""Soak benchmark: N concurrent clients index and search on loopback for T seconds against a real server.

Each client alternates IndexImages (one new image id per call) and Search (a crop of a photo with a box)
until the time is up; then it finishes its call in flight. A fraction of the calls (--abandon) is cancelled
by its client after a random 0-200 ms unless answered by then, as callers that time out or go away do;
those count as abandoned, not as errors, and the server must go on serving the others. The server's
resident memory is sampled all along from /proc. The report gives requests done, errors (by status code;
must be zero), p50/p99 latency per operation, and the server's memory: idle after start, the peak in the
first and the last quarter of the run, and VmHWM at the end, with the same figures per quarter so growth
shows as a trend.

    python bench/soak.py --models /tmp/models --clients 4 --seconds 120

Exits 1 if any call failed. Images are scikit-image's sample photos (shifted crops and mirror images),
so the benchmark needs no data set.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import random
import re
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from PIL import Image

from inserve.clients.client import AsyncInstanceSearchClient, ImageItem, InstanceSearchClient
from inserve.clients.local_server import local_server

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle", "immunohistochemistry", "coins", "camera")


def photo_pool(count: int) -> list[bytes]:
    """`count` distinct JPEGs: shifted three-quarter crops of the sample photos, every other one mirrored."""
    from skimage import data

    pool = []
    for i in range(count):
        name = PHOTOS[i % len(PHOTOS)]
        picture = np.asarray(data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)())
        if picture.ndim == 2:
            picture = np.repeat(picture[:, :, None], 3, axis=2)
        height, width = picture.shape[:2]
        step = i // len(PHOTOS)
        x, y = (step * 13) % (width // 4), (step * 11) % (height // 4)
        crop = picture[y : y + 3 * height // 4, x : x + 3 * width // 4, :3]
        if step % 2:
            crop = crop[:, ::-1]
        out = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(crop)).save(out, format="JPEG", quality=90)
        pool.append(out.getvalue())
    return pool


class MemorySampler:
    """VmRSS of a process every `interval` seconds, with the time of each sample."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        self.pid = pid
        self.samples: list[tuple[float, int]] = []  # (monotonic seconds, bytes)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.interval = interval

    def status(self, field: str) -> int:
        text = Path(f"/proc/{self.pid}/status").read_text()
        found = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
        if found is None:
            raise ProcessLookupError(f"process {self.pid} has exited")
        return int(found.group(1)) * 1024

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((time.monotonic(), self.status("VmRSS")))
            except OSError:  # the server is gone; main() reports it
                return
            self._stop.wait(self.interval)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def peak(self, start: float, end: float) -> int:
        return max((rss for t, rss in self.samples if start <= t <= end), default=0)


@dataclass
class Call:
    op: str  # index | search
    started: float  # monotonic seconds
    seconds: float
    code: str = "OK"


@dataclass
class Run:
    calls: list[Call] = field(default_factory=list)


ABANDONED = "ABANDONED"  # cancelled by the client on purpose (--abandon): not an error


# what each client does, call after call: the default alternates indexing new images and searching; churn
# indexes an image, searches, deletes the image again (the index stays small, its graphs and SQLite churn)
CYCLES = {"grow": ("index", "search"), "churn": ("index", "search", "delete")}


async def client_loop(
    address: str,
    pool: list[bytes],
    client_id: int,
    until: float,
    run: Run,
    timeout: float,
    abandon: float,
    cycle: tuple[str, ...] = CYCLES["grow"],
) -> None:
    rng = random.Random(client_id)
    async with AsyncInstanceSearchClient(address, timeout=timeout) as client:

        async def index(image: bytes, n: int) -> None:
            async for _ in client.index_images([ImageItem(f"c{client_id}-{n}", image)]):
                pass

        async def search(image: bytes, x: float, y: float) -> None:
            await client.search(image, box=(x, y, x + 180, y + 140), top_k=10)

        async def delete(n: int) -> None:
            await client.delete([f"c{client_id}-{n - 2}"])  # the image this cycle indexed

        n = 0
        while time.monotonic() < until:
            op = cycle[n % len(cycle)]
            image = pool[rng.randrange(len(pool))]
            if op == "index":
                call = index(image, n)
            elif op == "search":
                call = search(image, rng.uniform(0, 80), rng.uniform(0, 60))
            else:
                call = delete(n)
            started = time.monotonic()
            task = asyncio.ensure_future(call)
            code = "OK"
            if rng.random() < abandon:
                done, _ = await asyncio.wait([task], timeout=rng.uniform(0, 0.2))
                if not done:
                    task.cancel()
                    code = ABANDONED
            try:
                await task
            except asyncio.CancelledError:
                pass
            except grpc.RpcError as exc:
                code = exc.code().name
            run.calls.append(Call(op, started, time.monotonic() - started, code))
            n += 1


def percentiles(seconds: list[float]) -> tuple[float, float]:
    if not seconds:
        return float("nan"), float("nan")
    ms = np.array(seconds) * 1000
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def report(
    args: argparse.Namespace, run: Run, memory: MemorySampler, idle: int, hwm: int, t0: float, t1: float, images: int
) -> dict:
    mib = 1 << 20
    quarter = (t1 - t0) / 4
    errors = Counter(call.code for call in run.calls if call.code not in ("OK", ABANDONED))
    rows = []
    for op in (*dict.fromkeys(CYCLES[args.mode]), "all"):
        chosen = [c for c in run.calls if op in ("all", c.op)]
        p50, p99 = percentiles([c.seconds for c in chosen if c.code == "OK"])
        failed = sum(c.code not in ("OK", ABANDONED) for c in chosen)
        abandoned = sum(c.code == ABANDONED for c in chosen)
        rows.append((op, len(chosen), failed, abandoned, len(chosen) / (t1 - t0), p50, p99))
    windows = []
    for q in range(4):
        start, end = t0 + q * quarter, t0 + (q + 1) * quarter
        chosen = [c for c in run.calls if start <= c.started < end]
        p50, p99 = percentiles([c.seconds for c in chosen if c.code == "OK"])
        windows.append((q + 1, len(chosen), p50, p99, memory.peak(start, end) / mib))
    print(
        f"\nsoak ({args.mode}): {args.clients} clients, {t1 - t0:.0f} s,"
        f" server flags {' '.join(args.server_flags) or '(defaults)'}"
    )
    print("\n| operation | requests | errors | abandoned | requests/s | p50 ms | p99 ms |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for op, count, failed, abandoned, rate, p50, p99 in rows:
        print(f"| {op} | {count} | {failed} | {abandoned} | {rate:.2f} | {p50:.0f} | {p99:.0f} |")
    print("\n| quarter | requests | p50 ms | p99 ms | server peak RSS MiB |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for q, count, p50, p99, peak in windows:
        print(f"| {q} | {count} | {p50:.0f} | {p99:.0f} | {peak:.0f} |")
    first, last = windows[0][4], windows[-1][4]
    print(
        f"\nserver RSS idle after start {idle / mib:.0f} MiB; peak in the first quarter {first:.0f} MiB, in the last"
        f" {last:.0f} MiB (growth {last - first:+.0f} MiB while the index grew to {images} images); VmHWM at the end"
        f" {hwm / mib:.0f} MiB"
    )
    print("errors: " + (", ".join(f"{code} x{n}" for code, n in errors.items()) if errors else "none"))
    return {
        "clients": args.clients,
        "seconds": t1 - t0,
        "requests": len(run.calls),
        "errors": dict(errors),
        "operations": {
            op: {"requests": n, "errors": e, "abandoned": a, "per_s": r, "p50_ms": p50, "p99_ms": p99}
            for op, n, e, a, r, p50, p99 in rows
        },
        "quarters": [
            {"requests": n, "p50_ms": p50, "p99_ms": p99, "peak_rss_mib": peak} for _, n, p50, p99, peak in windows
        ],
        "rss_idle_mib": idle / mib,
        "rss_hwm_mib": hwm / mib,
        "images_indexed": images,
    }


async def soak(address: str, pool: list[bytes], args: argparse.Namespace, run: Run) -> tuple[float, float]:
    warm = time.monotonic() + 1.0  # every client makes a call or two before the measured run
    await asyncio.gather(
        *(client_loop(address, pool, 1000 + c, warm, Run(), args.timeout, 0.0) for c in range(args.clients))
    )
    t0 = time.monotonic()
    until = t0 + args.seconds
    cycle = CYCLES[args.mode]
    await asyncio.gather(
        *(client_loop(address, pool, c, until, run, args.timeout, args.abandon, cycle) for c in range(args.clients))
    )
    return t0, time.monotonic()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=120.0, help="length of the measured run (bounded)")
    parser.add_argument("--timeout", type=float, default=120.0, help="deadline of each call")
    parser.add_argument("--pool", type=int, default=64, help="distinct photos the clients draw from")
    parser.add_argument("--abandon", type=float, default=0.1, help="fraction of calls the client cancels")
    parser.add_argument(
        "--mode",
        choices=sorted(CYCLES),
        default="grow",
        help="grow: index and search; churn: index, search, delete (memory must stay bounded)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("server_flags", nargs="*", help="extra `inserve serve` flags, after --")
    args = parser.parse_args()
    if not 0 < args.seconds <= 3600:
        parser.error("--seconds must be in (0, 3600]")
    if not 0 <= args.abandon <= 1:
        parser.error("--abandon is a fraction of the calls, in [0, 1]")
    pool = photo_pool(args.pool)
    run = Run()
    with (
        tempfile.TemporaryDirectory(prefix="inserve-soak-") as scratch,
        local_server(args.models, Path(scratch), *args.server_flags, wait_ready=True) as running,
    ):
        memory = MemorySampler(running.process.pid)
        idle = memory.status("VmRSS")
        memory.start()
        t0, t1 = asyncio.run(soak(running.address, pool, args, run))
        memory.stop()
        if running.process.poll() is not None:
            print("".join(running.output[-30:]), file=sys.stderr)
            print(f"the server died during the run (exit code {running.process.returncode})", file=sys.stderr)
            return 1
        hwm = memory.status("VmHWM")
        with InstanceSearchClient(running.address) as client:
            images = client.stats().images
    figures = report(args, run, memory, idle, hwm, t0, t1, images)
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2))
    return 1 if figures["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
