"""Real inserve servers for tests: `inserve serve --port 0` in a subprocess, at a small long side."""

from __future__ import annotations

import re
import time
import urllib.request
from contextlib import AbstractContextManager
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from inserve.clients.local_server import LocalServer as Server
from inserve.clients.local_server import local_server

__all__ = ["BACKBONE", "LONG_SIDE", "Server", "metrics_port", "running_server", "scrape"]

BACKBONE = "efficientnet_lite0"
LONG_SIDE = 256  # small inputs keep DASR fast; the network still sees the objects


def running_server(
    models: Path, data_dir: Path, *flags: str, global_flags: tuple[str, ...] = ()
) -> AbstractContextManager[Server]:
    return local_server(
        models, data_dir, "--long-side", str(LONG_SIDE), *flags, global_flags=global_flags, stop_timeout=60
    )


def metrics_port(server: Server) -> int:
    for _ in range(100):
        found = re.search(r"inserve metrics on port (\d+)", "".join(server.output))
        if found:
            return int(found.group(1))
        time.sleep(0.05)
    raise AssertionError("no metrics port in:\n" + "".join(server.output))


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of the endpoint's text exposition."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
