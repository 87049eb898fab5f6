"""One server per port and per data directory: a second `inserve serve` on a port in use, or on a data directory
another process holds, is a one-line start-up error with exit code 2, and so are `whiten`, `eval` and
`bulk-index` on a directory a server holds; the first server goes on serving all it had."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from photos import encode, photo
from servers import LONG_SIDE, running_server

from inserve.clients.client import ImageItem, InstanceSearchClient

FLAGS = ("--recipe", "gem")


def inserve(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "inserve.clients.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def one_line_refusal(done: subprocess.CompletedProcess, message: str) -> None:
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert message in done.stderr


@pytest.fixture(scope="module")
def server(models_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    with running_server(models_dir, tmp_path_factory.mktemp("owner"), *FLAGS) as running:
        with InstanceSearchClient(running.address) as client:
            client.wait_ready()
            list(client.index_images([ImageItem("chelsea", encode(photo("chelsea")))]))
        yield running


def serve(models_dir: Path, data_dir: Path, port: str) -> subprocess.CompletedProcess:
    flags = ("--models", str(models_dir), "--data-dir", str(data_dir), "--long-side", str(LONG_SIDE), *FLAGS)
    return inserve("serve", "--host", "127.0.0.1", "--port", port, *flags)


def still_serves_all_it_had(server) -> None:
    with InstanceSearchClient(server.address) as client:
        assert client.stats().images == 1
        assert [hit.id for hit in client.search(encode(photo("chelsea")), top_k=1)] == ["chelsea"]


def test_a_second_server_on_a_port_in_use_does_not_start(server, models_dir: Path, tmp_path: Path) -> None:
    port = server.address.rsplit(":", 1)[1]
    one_line_refusal(serve(models_dir, tmp_path / "other", port), f"cannot listen on 127.0.0.1:{port}")
    still_serves_all_it_had(server)


def test_a_second_server_on_a_data_directory_in_use_does_not_start(server, models_dir: Path) -> None:
    held = f"data directory {server.data_dir} is in use by another inserve process (pid {server.process.pid})"
    one_line_refusal(serve(models_dir, server.data_dir, "0"), held)
    still_serves_all_it_had(server)


@pytest.mark.parametrize(
    "command",
    [
        ("whiten",),
        ("eval", "DATASET", "--recipe", "gem"),
        ("bulk-index", "PHOTO", "--recipe", "gem"),
    ],
    ids=["whiten", "eval", "bulk-index"],
)
def test_local_commands_on_a_data_directory_a_server_holds_are_refused(
    server, models_dir: Path, tmp_path: Path, command: tuple[str, ...]
) -> None:
    (tmp_path / "gnd.json").write_text('{"images": [], "queries": []}')
    (tmp_path / "photo.jpg").write_bytes(encode(photo("coffee")))
    given = [{"DATASET": str(tmp_path), "PHOTO": str(tmp_path / "photo.jpg")}.get(arg, arg) for arg in command]
    done = inserve(
        *given, "--data-dir", str(server.data_dir), *(["--models", str(models_dir)] * (command[0] != "whiten"))
    )
    one_line_refusal(done, f"(pid {server.process.pid})")
    still_serves_all_it_had(server)
