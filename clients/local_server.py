"""A real `inserve serve` on a free loopback port, in a subprocess: for integration tests, benchmarks and
notebooks that want the whole service (gRPC, batcher, index files) rather than the classes in-process; and a
real `milvus-lite server` for replicas to share."""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from inserve.clients.client import InstanceSearchClient

LISTENING = re.compile(r"inserve listening on port (\d+)")


@dataclass
class LocalServer:
    address: str
    process: subprocess.Popen
    data_dir: Path
    output: list[str]  # the server's log lines so far, appended while it runs


@contextmanager
def local_server(
    models: Path,
    data_dir: Path,
    *flags: str,
    global_flags: tuple[str, ...] = (),
    stop_timeout: float = 120.0,
    wait_ready: bool = False,
) -> Iterator[LocalServer]:
    """`inserve [global_flags] serve --port 0 --host 127.0.0.1 [flags]` until the block ends; then SIGTERM
    (the server drains), and SIGKILL if it has not exited after `stop_timeout` seconds. Yields once the
    port is bound, or with `wait_ready` once a plaintext channel to it is ready (not for TLS servers)."""
    command = [sys.executable, "-m", "inserve.clients.cli", *global_flags, "serve", "--port", "0", "--host"]
    command += ["127.0.0.1", "--data-dir", str(data_dir), "--models", str(models), *flags]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines: list[str] = []
        port = None
        for line in process.stdout:
            lines.append(line)
            found = LISTENING.search(line)
            if found:
                port = int(found.group(1))
                break
        if port is None:
            raise RuntimeError("the server did not start:\n" + "".join(lines[-40:]))
        threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True).start()
        address = f"127.0.0.1:{port}"
        if wait_ready:
            with InstanceSearchClient(address) as client:
                client.wait_ready()
        yield LocalServer(address, process, Path(data_dir), lines)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=stop_timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def milvus_lite_server(data_dir: Path, port: int) -> Iterator[subprocess.Popen]:
    """`milvus-lite server` (the `cluster` extra) on a loopback port until the block ends, then killed: a store
    several `inserve serve --store milvus://127.0.0.1:PORT` share."""
    executable = shutil.which("milvus-lite", path=str(Path(sys.executable).parent)) or "milvus-lite"
    process = subprocess.Popen(
        [executable, "server", "--data-dir", str(data_dir), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("milvus-lite server did not start") from None
                time.sleep(0.2)
        yield process
    finally:
        process.kill()
        process.wait()
