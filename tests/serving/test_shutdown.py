"""Graceful shutdown on SIGTERM: the server stops taking calls, lets those in flight finish (up to the grace
period), snapshots its graphs and exits 0; nothing acknowledged is lost and no catch-up is needed after."""

from __future__ import annotations

import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from photos import PHOTOS, encode, photo
from servers import Server, running_server

from inserve.clients.client import ImageItem, InstanceSearchClient

LOGS = ("--log-level", "INFO")


def items(count: int, pause_s: float = 0.0, hold: threading.Event | None = None) -> Iterator[ImageItem]:
    """`count` photos, `pause_s` apart; then, with `hold`, the stream stays open until it is set."""
    for i in range(count):
        time.sleep(pause_s)
        yield ImageItem(f"img{i}", encode(photo(PHOTOS[i % len(PHOTOS)])[: 200 + 10 * i]))
    if hold is not None:
        hold.wait(60)


def stopped(server: Server, timeout: float = 60) -> str:
    assert server.process.wait(timeout) == 0
    return "".join(server.output)


def caught_up_on_restart(models: Path, data_dir: Path) -> tuple[int, str]:
    with (
        running_server(models, data_dir, "--recipe", "gem", global_flags=LOGS) as server,
        InstanceSearchClient(server.address, timeout=60) as client,
    ):
        images = client.stats().images
    found = re.search(r"gem/global: \d+ vectors \((\w+), (\d+) caught up from SQLite\)", "".join(server.output))
    assert found, "".join(server.output)
    return images, f"{found.group(1)} {found.group(2)}"


def test_sigterm_drains_the_stream_in_flight_refuses_new_calls_and_exits_0(models_dir: Path, tmp_path: Path) -> None:
    count = 15
    with running_server(models_dir, tmp_path, "--recipe", "gem", global_flags=LOGS) as server:
        acked = []
        with InstanceSearchClient(server.address, timeout=120) as client:
            client.wait_ready()
            for ack in client.index_images(items(count, pause_s=0.2)):
                acked.append(ack.id)
                if len(acked) == 3:
                    server.process.send_signal(signal.SIGTERM)
                    time.sleep(0.3)
                    with (
                        InstanceSearchClient(server.address, timeout=5) as late,
                        pytest.raises(grpc.RpcError) as refused,
                    ):
                        late.stats()
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert acked == [f"img{i}" for i in range(count)]  # the stream in flight finished
        log = stopped(server)
    assert "stopping: no new calls; draining calls in flight" in log and "stopped cleanly" in log
    assert caught_up_on_restart(models_dir, tmp_path) == (count, "snapshot 0")


def test_a_call_outlasting_the_grace_period_is_cut_and_the_server_still_exits_0(
    models_dir: Path, tmp_path: Path
) -> None:
    hold = threading.Event()
    flags = ("--recipe", "gem", "--shutdown-grace", "1")
    with running_server(models_dir, tmp_path, *flags, global_flags=LOGS) as server:
        acked = []
        with InstanceSearchClient(server.address, timeout=120) as client:
            client.wait_ready()
            started = None
            with pytest.raises(grpc.RpcError) as cut:
                for ack in client.index_images(items(2, hold=hold)):
                    acked.append(ack.id)
                    if len(acked) == 2:
                        server.process.send_signal(signal.SIGTERM)
                        started = time.monotonic()
            hold.set()
        assert cut.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
        log = stopped(server, timeout=30)
        assert time.monotonic() - started < 15
    assert "stopped cleanly" in log
    assert caught_up_on_restart(models_dir, tmp_path) == (2, "snapshot 0")
