"""One process per data directory: an exclusive lock held while an index is open on it.

Two processes writing one directory each keep graphs of only what they wrote themselves, and their snapshots
then disagree with SQLite. The lock is `flock` on a file in the directory: the kernel releases it when the
holder exits, however it exits (SIGKILL included), so a crash never leaves a stale lock behind.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from inserve.server.errors import ConfigError

INDEX_FILE = "index.sqlite"  # metadata and raw vectors; the graphs' snapshots are in graphs/
LOCK_FILE = "inserve.lock"  # holds the pid of the process that has the directory open


class DataDirInUse(ConfigError):
    """Another process (a server, `inserve whiten`, `bulk-index`, `eval`) has the data directory open."""


def usable_data_dir(data_dir: Path) -> Path:
    """The directory, created when missing; ConfigError with one line when it is a file or cannot be written."""
    if data_dir.exists() and not data_dir.is_dir():
        raise ConfigError(f"data directory {data_dir} is a file, not a directory")
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create data directory {data_dir}: {exc.strerror}") from exc
    if not os.access(data_dir, os.W_OK | os.X_OK):
        raise ConfigError(f"data directory {data_dir} is not writable")
    return data_dir


class DataDirLock:
    """Held from construction until `release` (or the process's end); DataDirInUse names the holder's pid."""

    def __init__(self, data_dir: Path) -> None:
        self.path = usable_data_dir(Path(data_dir)) / LOCK_FILE
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise ConfigError(f"cannot lock data directory {data_dir}: {exc.strerror}") from exc
            raise DataDirInUse(
                f"data directory {data_dir} is in use by another inserve process (pid {holder}); stop it first, "
                "or give this one a directory of its own"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing the only descriptor releases the flock
            self._fd = None
