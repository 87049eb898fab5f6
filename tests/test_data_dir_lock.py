"""One process per data directory: a second index on it is refused with the holder's pid, the lock goes with its
holder however it ends (SIGKILL included), and a directory that cannot hold an index is one clear error."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from inserve.server.config import IndexConfig
from inserve.server.errors import ConfigError
from inserve.server.index import InstanceIndex, NewVectors
from inserve.server.index.data_dir import DataDirInUse, DataDirLock

CONFIG = IndexConfig(auto_whiten_per_dim=0)
HOLD = (
    "import sys, time; from inserve.server.index.data_dir import DataDirLock; DataDirLock(sys.argv[1]); "
    "print('held', flush=True); time.sleep(600)"
)


def holder(data_dir: Path) -> subprocess.Popen:
    """Another process holding the directory until it is killed."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(data_dir)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_second_index_on_a_directory_is_refused_naming_the_holder(tmp_path: Path) -> None:
    first = InstanceIndex(tmp_path, CONFIG)
    try:
        with pytest.raises(DataDirInUse, match=rf"in use by another inserve process \(pid {os.getpid()}\)"):
            InstanceIndex(tmp_path, CONFIG)
    finally:
        first.close()
    InstanceIndex(tmp_path, CONFIG).close()  # closing gave it back


def test_another_process_holds_it_until_it_is_killed(tmp_path: Path) -> None:
    process = holder(tmp_path)
    try:
        with pytest.raises(DataDirInUse, match=rf"\(pid {process.pid}\)"):
            InstanceIndex(tmp_path, CONFIG)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    index = InstanceIndex(tmp_path, CONFIG)  # no stale lock after a SIGKILL
    index.add_image("a", [NewVectors("r", "global", np.ones((1, 4), np.float32))], width=64, height=64)
    index.close()


def test_an_index_that_fails_to_open_gives_the_directory_back(tmp_path: Path) -> None:
    (tmp_path / "index.sqlite").write_bytes(b"not a database" * 100)
    with pytest.raises(Exception, match="not a database"):
        InstanceIndex(tmp_path, CONFIG)
    DataDirLock(tmp_path).release()


def test_a_directory_that_cannot_hold_an_index_is_one_clear_error(tmp_path: Path) -> None:
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(ConfigError, match=f"data directory {file} is a file, not a directory"):
        InstanceIndex(file, CONFIG)
    with pytest.raises(ConfigError, match=f"cannot create data directory {file / 'sub'}"):
        InstanceIndex(file / "sub", CONFIG)
