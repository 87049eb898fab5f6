"""Faults injected into a real server, and what survived them (issue 16, "Measured").

Every fault hits one data directory that keeps growing from round to round, as a crash-looping deployment's
would. After each fault a server is started again on it and the bench checks what a caller relies on:
every acknowledged image and keyframe is found, each once; what was deleted and acknowledged stays deleted;
SQLite passes its integrity check; the server answers.

- `SIGKILL, IndexImages stream`: the server is killed after a random number (5-30) of acknowledgements.
- `SIGKILL after Delete`: a few images are deleted, the server killed as soon as Delete answers.
- `SIGKILL, IndexVideo upload`: killed once the upload reports its first committed keyframes.
- `SIGTERM, IndexImages stream`: the stream in flight drains; every image sent must be acknowledged.
- `caller cancels IndexImages`: the client goes away after a few acknowledgements; the server answers the
  next call at once.
- `graph snapshot truncated`: the server is stopped and its hnswlib snapshots cut in half on disk.
- `graph snapshot deleted`: the same, the snapshots removed (the graphs are rebuilt from SQLite).

    python bench/faults.py --models bench/out/models --rounds 3 [--video ../shared/data/videos/bikes.mp4]

Images are distinct crops of scikit-image's sample photos (bench/soak.py); recipe gem, snapshots every
8 vectors so that kills land between snapshots.
"""

from __future__ import annotations

import argparse
import random
import signal
import sqlite3
import sys
import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from soak import photo_pool

from inserve.clients.client import ImageItem, InstanceSearchClient, VideoItem
from inserve.clients.local_server import LocalServer, local_server

FLAGS = ("--recipe", "gem", "--snapshot-every", "8")
SHARED_VIDEO = Path(__file__).resolve().parents[2] / "shared" / "data" / "videos" / "bikes.mp4"
PROBE = 0  # the image every listing search is made with


@dataclass
class Outcome:
    """What one kind of fault left, summed over its rounds."""

    rounds: int = 0
    acknowledged: int = 0  # images, keyframes and deletes the callers were told are done
    held: int = 0  # of those, as acknowledged after the fault: stored ones found, deleted ones not
    duplicates: int = 0  # ids a search returned more than once
    deleted_back: int = 0  # acknowledged deletes found again
    integrity_failures: int = 0
    answered: int = 0  # rounds after which the server answered GetStats and Search
    notes: list[str] = field(default_factory=list)


class Collection:
    """The data directory, its images, and what the callers were told about them."""

    def __init__(self, models: Path, data_dir: Path, pool: list[bytes], video: Path | None) -> None:
        self.models, self.data_dir, self.pool, self.video = models, data_dir, pool, video
        self.next = 0
        self.stored: set[str] = set()  # acknowledged and not deleted
        self.deleted: set[str] = set()
        self.just_deleted: set[str] = set()  # acknowledged by the last fault's Delete
        self.just_indexed = ""  # the video the last fault's upload committed keyframes of
        self.videos: dict[str, int] = {}  # video id -> keyframes acknowledged as committed
        self.notes: list[str] = []

    def server(self) -> AbstractContextManager[LocalServer]:
        return local_server(self.models, self.data_dir, *FLAGS, wait_ready=True)

    def items(self, count: int) -> list[ImageItem]:
        first, self.next = self.next, self.next + count
        return [ImageItem(f"img{n:04d}", self.pool[n % len(self.pool)]) for n in range(first, self.next)]

    def check(self, outcome: Outcome, acknowledged: set[str]) -> None:
        """After a fault: the acknowledged ids of this round are found, nothing twice, deletes stay deleted."""
        db = sqlite3.connect(self.data_dir / "index.sqlite")
        try:
            if db.execute("PRAGMA integrity_check").fetchall() != [("ok",)]:
                outcome.integrity_failures += 1
        finally:
            db.close()
        with self.server() as srv, InstanceSearchClient(srv.address, timeout=300) as client:
            stats = client.stats()
            hits = [hit.id for hit in client.search(self.pool[PROBE], top_k=1000)]
            images = {hit for hit in hits if "#" not in hit}
            outcome.rounds += 1
            outcome.acknowledged += len(acknowledged) + len(self.just_deleted)
            outcome.held += len(acknowledged & images) + len(self.just_deleted - images)
            if self.just_indexed:
                found = sum(1 for hit in hits if hit.startswith(self.just_indexed + "#"))
                outcome.acknowledged += self.videos[self.just_indexed]
                outcome.held += min(found, self.videos[self.just_indexed])
            self.just_deleted, self.just_indexed = set(), ""
            outcome.duplicates += len(hits) - len(set(hits))
            outcome.deleted_back += len(self.deleted & images)
            for video, committed in self.videos.items():
                found = sum(1 for hit in hits if hit.startswith(video + "#"))
                if found < committed:
                    outcome.notes.append(f"{video}: {committed} keyframes acknowledged, {found} found")
            outcome.answered += int(stats.images == len(hits))
            self.stored |= acknowledged


def kill(srv: LocalServer) -> None:
    srv.process.kill()
    srv.process.wait()


def stream_then(col: Collection, count: int, stop_after: int, action: Callable[[LocalServer], None]) -> set[str]:
    """Stream `count` new images; after `stop_after` acknowledgements run `action` (a fault). Returns the ids
    acknowledged."""
    acked: set[str] = set()
    with col.server() as srv, InstanceSearchClient(srv.address, timeout=300) as client:
        try:
            for ack in client.index_images(col.items(count)):
                acked.add(ack.id)
                if len(acked) == stop_after:
                    action(srv)
        except grpc.RpcError:
            pass
    return acked


def sigkill_stream(col: Collection, rng: random.Random) -> set[str]:
    return stream_then(col, 40, rng.randint(5, 30), kill)


def sigterm_stream(col: Collection, rng: random.Random) -> set[str]:
    """The stream in flight at SIGTERM drains: all its 12 images are acknowledged (the table's found column
    counts them against those acknowledged; `unacknowledged` notes a stream cut short)."""
    acked = stream_then(col, 12, rng.randint(1, 6), lambda srv: srv.process.send_signal(signal.SIGTERM))
    if len(acked) < 12:
        col.notes.append(f"SIGTERM: {12 - len(acked)} of 12 images unacknowledged")
    return acked


def sigkill_after_delete(col: Collection, rng: random.Random) -> set[str]:
    with col.server() as srv, InstanceSearchClient(srv.address, timeout=300) as client:
        gone = sorted(rng.sample(sorted(col.stored), min(3, len(col.stored))))
        if client.delete(gone).deleted == len(gone):
            col.deleted |= set(gone)
            col.stored -= set(gone)
            col.just_deleted = set(gone)
        kill(srv)
    return set()


def sigkill_video(col: Collection, rng: random.Random) -> set[str]:
    video_id = f"video{len(col.videos)}"
    committed = 0
    with col.server() as srv, InstanceSearchClient(srv.address, timeout=300) as client:
        try:
            for progress in client.index_video(VideoItem(video_id, file=col.video)):
                committed = progress.keyframes_committed
                if committed:
                    kill(srv)
        except grpc.RpcError:
            pass
    col.videos[video_id] = committed
    col.just_indexed = video_id
    return set()


def caller_cancels(col: Collection, rng: random.Random) -> set[str]:
    acked: set[str] = set()
    with col.server() as srv, InstanceSearchClient(srv.address, timeout=300) as client:
        stream = client.index_images(col.items(20))
        leave_after = rng.randint(2, 6)
        try:
            for ack in stream:
                acked.add(ack.id)
                if len(acked) == leave_after:
                    stream.cancel()
        except grpc.RpcError:
            pass
        client.stats()  # still serving
    return acked


def damage_graphs(cut: bool) -> Callable[[Collection, random.Random], set[str]]:
    def damage(col: Collection, rng: random.Random) -> set[str]:
        acked = stream_then(col, 6, 0, lambda srv: None)
        for graph in (col.data_dir / "graphs").glob("*.hnsw"):
            if cut:
                graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 2])
            else:
                graph.unlink()
        return acked

    return damage


FAULTS: dict[str, Callable[[Collection, random.Random], set[str]]] = {
    "SIGKILL, IndexImages stream": sigkill_stream,
    "SIGKILL after Delete": sigkill_after_delete,
    "SIGKILL, IndexVideo upload": sigkill_video,
    "SIGTERM, IndexImages stream": sigterm_stream,
    "caller cancels IndexImages": caller_cancels,
    "graph snapshot truncated": damage_graphs(cut=True),
    "graph snapshot deleted": damage_graphs(cut=False),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=Path("bench/out/models"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--video", type=Path, default=SHARED_VIDEO)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not args.video.is_file():
        parser.error(f"no video at {args.video} (--video)")
    rng = random.Random(args.seed)
    outcomes = {name: Outcome() for name in FAULTS}
    with tempfile.TemporaryDirectory() as scratch:
        col = Collection(args.models, Path(scratch) / "data", photo_pool(64), args.video)
        col.check(Outcome(), set(stream_then(col, 10, 0, lambda srv: None)))
        for round_ in range(args.rounds):
            for name, fault in FAULTS.items():
                col.check(outcomes[name], fault(col, rng))
                print(f"round {round_ + 1}: {name}", file=sys.stderr)
        images = len(col.stored)
    print(f"\n{args.rounds} rounds of each fault on one data directory ({images} images at the end)\n")
    print("| fault | rounds | acknowledged | held after | lost | duplicates | deletes undone | integrity | answered |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, o in outcomes.items():
        print(
            f"| {name} | {o.rounds} | {o.acknowledged} | {o.held} | {o.acknowledged - o.held} | {o.duplicates} | "
            f"{o.deleted_back} | {o.rounds - o.integrity_failures}/{o.rounds} ok | {o.answered}/{o.rounds} |"
        )
    for name, o in outcomes.items():
        for note in o.notes:
            print(f"{name}: {note}")
    for note in col.notes:
        print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
