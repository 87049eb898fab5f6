"""Real inserve servers for tests: `inserve serve --port 0` in a subprocess, at a small long side."""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path

from inserve.clients.local_server import LocalServer as Server
from inserve.clients.local_server import local_server

__all__ = ["BACKBONE", "LONG_SIDE", "Server", "running_server"]

BACKBONE = "efficientnet_lite0"
LONG_SIDE = 256  # small inputs keep DASR fast; the network still sees the objects


def running_server(
    models: Path, data_dir: Path, *flags: str, global_flags: tuple[str, ...] = ()
) -> AbstractContextManager[Server]:
    return local_server(
        models, data_dir, "--long-side", str(LONG_SIDE), *flags, global_flags=global_flags, stop_timeout=60
    )
