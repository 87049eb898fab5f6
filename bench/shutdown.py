"""Time from SIGTERM to exit of a real server: idle, and with an IndexImages stream in flight (which drains).

Each round starts `inserve serve` (default recipe, fresh data directory), indexes a few photos, then sends
SIGTERM either with nothing in flight or right after the third acknowledgement of a 40-image stream, and times
until the process has exited (it snapshots the graphs first). Prints medians over the rounds.

    python bench/shutdown.py --models bench/out/models [--rounds 3]
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np
from PIL import Image

from inserve.clients.client import ImageItem, InstanceSearchClient
from inserve.clients.local_server import local_server


def photos(count: int) -> list[bytes]:
    import io

    from skimage import data

    base = np.asarray(data.astronaut())
    out = []
    for i in range(count):
        buffer = io.BytesIO()
        Image.fromarray(np.roll(base, 7 * i, axis=1)).save(buffer, "JPEG")
        out.append(buffer.getvalue())
    return out


def one_round(models: Path, in_flight: bool) -> tuple[float, int]:
    """(seconds from SIGTERM to exit, acknowledgements the stream got)."""
    images = photos(40)
    with tempfile.TemporaryDirectory() as data_dir, local_server(models, Path(data_dir), wait_ready=True) as srv:
        acked = 0
        with InstanceSearchClient(srv.address) as client:
            list(client.index_images(ImageItem(f"warm{i}", images[i]) for i in range(3)))
            stream_done = threading.Event()
            if in_flight:
                third = threading.Event()

                def stream() -> None:
                    nonlocal acked
                    try:
                        for _ in client.index_images(ImageItem(f"s{i}", image) for i, image in enumerate(images)):
                            acked += 1
                            if acked == 3:
                                third.set()
                    except grpc.RpcError:
                        pass
                    finally:
                        third.set()
                        stream_done.set()

                threading.Thread(target=stream, daemon=True).start()
                third.wait(120)
            start = time.monotonic()
            srv.process.send_signal(signal.SIGTERM)
            srv.process.wait(300)
            seconds = time.monotonic() - start
            stream_done.wait(30)
    return seconds, acked


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=Path("bench/out/models"))
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rows = []
    for in_flight in (False, True):
        runs = [one_round(args.models, in_flight) for _ in range(args.rounds)]
        seconds = statistics.median(s for s, _ in runs)
        rows.append((in_flight, seconds, [a for _, a in runs]))
    print("| SIGTERM | seconds to exit (median) | stream acks per round |")
    print("| --- | --- | --- |")
    for in_flight, seconds, acked in rows:
        what = "during a 40-image IndexImages stream" if in_flight else "idle"
        print(f"| {what} | {seconds:.2f} | {', '.join(map(str, acked)) if in_flight else '-'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
