"""Real inserve servers for tests: `inserve serve --port 0` in a subprocess."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

BACKBONE = "efficientnet_lite0"
LONG_SIDE = 256  # small inputs keep DASR fast; the network still sees the objects


@dataclass
class Server:
    address: str
    process: subprocess.Popen
    data_dir: Path
    output: list[str]  # the server's log lines so far


@contextmanager
def running_server(models: Path, data_dir: Path, *flags: str, global_flags: tuple[str, ...] = ()) -> Iterator[Server]:
    """`inserve [global_flags] serve --port 0 [flags]` in a subprocess until the block ends (SIGTERM, then
    wait)."""
    command = [sys.executable, "-m", "inserve.clients.cli", *global_flags, "serve", "--port", "0"]
    command += ["--host", "127.0.0.1"]
    command += ["--data-dir", str(data_dir), "--models", str(models), "--long-side", str(LONG_SIDE), *flags]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        port = None
        lines = []
        for line in process.stdout:
            lines.append(line)
            found = re.search(r"inserve listening on port (\d+)", line)
            if found:
                port = int(found.group(1))
                break
        if port is None:
            raise RuntimeError("server did not start:\n" + "".join(lines))
        drain = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
        drain.start()
        yield Server(f"127.0.0.1:{port}", process, data_dir, lines)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
