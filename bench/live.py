"""Live streams: how long a keyframe takes from its arrival at the server to being searchable.

Plays videos of shared/data/videos at their own frame rate (`inserve ingest --realtime`, i.e. LiveIngest over
source_frames) into a real server (`inserve serve`, the default recipe and settings) and reports, per scenario,
the keyframes acknowledged, frames dropped, and the latency each acknowledgement carries (arrival at the server
to commit), as medians and 90th percentiles side by side:

  1. one stream at the default keyframe rules (a keyframe every 0.5-2 s): the server keeps up;
  2. two streams at once;
  3. a stream asking for more keyframes than the server can describe (one every 0.1 s), with the overload
     policy "wait" (the sender is slowed: nothing lost, latency grows by the window) and "drop";
  4. IndexVideo of the same files (a keyframe every 0.5 s at most): when its first keyframe became searchable
     against when the video was done (before, every keyframe became searchable only then). Keyframes of a file
     are described a batch (BatcherConfig.max_batch) at a time, so a video with fewer keyframes than that shows
     them all at once.

    python bench/live.py --models bench/out/models [--json bench/out/live.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from dasr import ensure_models

from inserve.clients.client import InstanceSearchClient, LiveStreamSpec, VideoItem
from inserve.clients.ingest import LiveIngest, source_frames
from inserve.clients.local_server import local_server


@dataclass
class Played:
    scenario: str
    video: str
    seconds: float  # wall time of the whole stream
    keyframes: int
    dropped: int
    latency_p50_ms: float
    latency_p90_ms: float
    latency_max_ms: float
    server_peak_rss_mib: float = 0.0  # during the scenario


class PeakRss:
    """The largest resident set of process `pid` while the block runs, sampled every 20 ms from /proc."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak_mib = pid, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample)

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            status = Path(f"/proc/{self.pid}/status").read_text()
            kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
            self.peak_mib = max(self.peak_mib, kib / 1024)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def play(address: str, scenario: str, video: Path, stream_id: str, **spec: object) -> Played:
    with InstanceSearchClient(address) as client:
        ingest = LiveIngest(client, LiveStreamSpec(stream_id, **spec), source_frames(str(video), realtime=True))
        latencies, dropped, started = [], 0, time.monotonic()
        for event in ingest.events():
            if event.WhichOneof("event") == "keyframe":
                latencies.append(1000 * event.keyframe.latency_s)
            elif event.WhichOneof("event") == "dropped":
                dropped += event.dropped.frames
    deciles = statistics.quantiles(latencies, n=10, method="inclusive") if len(latencies) > 1 else latencies * 9
    return Played(
        scenario,
        video.name,
        time.monotonic() - started,
        len(latencies),
        dropped,
        statistics.median(latencies),
        deciles[8],
        max(latencies),
    )


def together(address: str, scenario: str, videos: list[Path]) -> list[Played]:
    results: list[Played] = []
    threads = [
        threading.Thread(target=lambda v=v, i=i: results.append(play(address, scenario, v, f"{scenario}-{i}")))
        for i, v in enumerate(videos)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def index_video_timeline(address: str, video: Path) -> dict[str, float]:
    with InstanceSearchClient(address) as client:
        started, first = time.monotonic(), None
        item = VideoItem(f"file-{video.stem}", file=video, max_interval_s=0.5)  # more than one batch of keyframes
        for progress in client.index_video(item):
            if first is None and progress.keyframes_committed:
                first = time.monotonic() - started
            last = progress
        return {
            "video": video.name,
            "keyframes": last.keyframes_committed,
            "first_searchable_s": first,
            "done_s": time.monotonic() - started,
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=Path("bench/out/models"))
    parser.add_argument("--videos", type=Path, default=Path("../shared/data/videos"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    ensure_models(args.models, "efficientnet_lite0", random_init=False)
    bikes, bunny = args.videos / "bikes.mp4", args.videos / "bigbuckbunny.mp4"
    with tempfile.TemporaryDirectory() as data_dir, local_server(args.models, Path(data_dir), wait_ready=True) as srv:
        scenarios = [
            lambda: [play(srv.address, "one stream", bikes, "one")],
            lambda: together(srv.address, "two streams", [bikes, bunny]),
            *(
                lambda overload=overload: [
                    play(
                        srv.address,
                        f"10 keyframes/s, {overload}",
                        bikes,
                        overload,
                        overload=overload,
                        min_interval_s=0.1,
                        max_interval_s=0.1,
                    )
                ]
                for overload in ("wait", "drop")
            ),
        ]
        played = []
        for scenario in scenarios:
            with PeakRss(srv.process.pid) as rss:
                results = scenario()
            played += [replace(p, server_peak_rss_mib=rss.peak_mib) for p in results]
        timelines = [index_video_timeline(srv.address, video) for video in (bikes, bunny)]

    base = played[0].latency_p50_ms
    print(
        f"{'scenario':<24} {'video':<18} {'wall s':>7} {'keyframes':>9} {'dropped':>7} "
        f"{'p50 ms':>7} {'p90 ms':>7} {'max ms':>7} {'p50 / one stream':>16} {'server peak RSS MiB':>19}"
    )
    for p in played:
        print(
            f"{p.scenario:<24} {p.video:<18} {p.seconds:7.1f} {p.keyframes:9d} {p.dropped:7d} "
            f"{p.latency_p50_ms:7.0f} {p.latency_p90_ms:7.0f} {p.latency_max_ms:7.0f} {p.latency_p50_ms / base:16.2f} "
            f"{p.server_peak_rss_mib:19.0f}"
        )
    print()
    print(f"{'IndexVideo':<18} {'keyframes':>9} {'first searchable s':>18} {'done s':>7}")
    for t in timelines:
        print(f"{t['video']:<18} {t['keyframes']:9d} {t['first_searchable_s']:18.2f} {t['done_s']:7.2f}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"live": [asdict(p) for p in played], "index_video": timelines}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
