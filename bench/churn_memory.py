"""What holds memory under index-search-delete churn (issue 16): the serving core in a fresh process per
variant, two threads doing index -> search -> delete cycles as the server's workers would, the process's
RSS sampled every `--every` cycles. The variants change one suspect at a time:

- `default`: as `inserve serve` runs.
- `traced`: default, with tracemalloc counting what Python objects and numpy arrays hold (numpy reports its
  buffers to tracemalloc), so RSS growth that the traced heap does not show is native: ONNX Runtime's
  arenas, glibc's malloc arenas, hnswlib, SQLite.
- `malloc-arenas-2`: MALLOC_ARENA_MAX=2 (glibc keeps one malloc arena per thread that ever allocated, up to
  8 per core, and returns little of them).
- `no-cpu-arena`: ONNX Runtime without its CPU memory arena (`--no-cpu-arena`, EngineOptions.cpu_arena).

    python bench/churn_memory.py --models bench/out/models --cycles 400

Prints RSS per quarter of the cycles for each variant, side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

VARIANTS = ("default", "traced", "malloc-arenas-2", "no-cpu-arena")
THREADS = 2
GROWTH_SITES = 8  # allocation sites listed by how much more they hold at the end than after the first quarter


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def churn(models: Path, cycles: int, every: int, variant: str) -> dict:
    """Run in the child process: the cycles, RSS (and the traced heap) every `every` cycles."""
    import tracemalloc

    from soak import photo_pool

    from inserve.engines import EngineOptions
    from inserve.server.config import ServerConfig
    from inserve.server.instance_search import InstanceSearch

    if variant == "traced":
        tracemalloc.start()
    pool = photo_pool(64)
    samples: list[dict] = []
    with tempfile.TemporaryDirectory() as data_dir:
        engine = EngineOptions(cpu_arena=variant != "no-cpu-arena")
        core = InstanceSearch(ServerConfig(data_dir=Path(data_dir), models=models, engine=engine))
        lock = threading.Lock()
        done = [0]
        first_quarter: list[tracemalloc.Snapshot] = []

        def worker(offset: int) -> None:
            n = offset
            while True:
                with lock:
                    if done[0] >= cycles:
                        return
                    done[0] += 1
                    cycle = done[0]
                image = pool[n % len(pool)]
                core.index_image(f"churn-{offset}-{n}", image)
                core.search(image, box=(10.0, 10.0, 200.0, 150.0))
                core.delete([f"churn-{offset}-{n}"])
                n += THREADS
                if cycle % every == 0:
                    traced = tracemalloc.get_traced_memory()[0] / 2**20 if tracemalloc.is_tracing() else None
                    with lock:
                        samples.append({"cycle": cycle, "rss": rss_mib(), "traced": traced})
                        if traced is not None and cycle == every * max(1, cycles // (4 * every)):
                            first_quarter.append(tracemalloc.take_snapshot())

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
        start = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        seconds = time.monotonic() - start
        images = core.stats().images
        grew = []
        if first_quarter:
            growth = tracemalloc.take_snapshot().compare_to(first_quarter[0], "lineno")
            grew = [(str(stat.traceback[0]), stat.size_diff / 2**20) for stat in growth[:GROWTH_SITES]]
        core.close()
    samples.sort(key=lambda s: s["cycle"])
    return {"variant": variant, "samples": samples, "images_left": images, "grew": grew, "seconds": seconds}


def quarter_peaks(samples: list[dict], key: str) -> list[float]:
    quarters: list[list[float]] = [[], [], [], []]
    last = samples[-1]["cycle"]
    for sample in samples:
        if sample[key] is not None:
            quarters[min(3, 4 * (sample["cycle"] - 1) // last)].append(sample[key])
    return [max(q) if q else float("nan") for q in quarters]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, required=True)
    parser.add_argument("--cycles", type=int, default=400)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(churn(args.models, args.cycles, args.every, args.child)))
        return 0
    results = []
    for variant in args.variants:
        env = dict(os.environ, **({"MALLOC_ARENA_MAX": "2"} if variant == "malloc-arenas-2" else {}))
        command = [sys.executable, __file__, "--models", str(args.models), "--cycles", str(args.cycles)]
        command += ["--every", str(args.every), "--child", variant]
        out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
        print(f"{variant}: done", file=sys.stderr)
    print(f"\n{args.cycles} index-search-delete cycles, {THREADS} threads; peak MiB per quarter of the cycles\n")
    print("| variant | RSS q1 | q2 | q3 | q4 | q4 - q1 | traced heap q1 | q4 | images left | ms / cycle |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for result in results:
        rss = quarter_peaks(result["samples"], "rss")
        traced = quarter_peaks(result["samples"], "traced")
        heap = f"{traced[0]:.0f} | {traced[3]:.0f}" if result["variant"] == "traced" else " | "
        per_cycle = 1000 * result["seconds"] / args.cycles
        print(
            f"| {result['variant']} | {rss[0]:.0f} | {rss[1]:.0f} | {rss[2]:.0f} | {rss[3]:.0f} | "
            f"{rss[3] - rss[0]:+.0f} | {heap} | {result['images_left']} | {per_cycle:.0f} |"
        )
    for result in results:
        if result["grew"]:
            print(f"\n{result['variant']}: what the traced heap gained after the first quarter, by allocation site\n")
            print("| site | MiB |\n|---|---|")
            for site, mib in result["grew"]:
                print(f"| {site} | {mib:+.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
