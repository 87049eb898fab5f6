"""Server-side video files: only under the configured media root, whatever `..` or symlinks say."""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

from inserve.server.errors import MediaAccessDenied


def _inside(root: str, path: str) -> bool:
    return os.path.commonpath([root, path]) == root


def open_media(root: Path | None, requested: str) -> BinaryIO:
    """Open a file named relative to (or absolutely under) the media root, for reading.

    The path is resolved with realpath (every `..` and symlink followed) and must stay under the root's
    own realpath; the file is then opened without following a final symlink and its descriptor checked
    again, so swapping a component for a symlink after the check does not get out either.
    Raises MediaAccessDenied, or FileNotFoundError when the file is not there.
    """
    if root is None:
        raise MediaAccessDenied("this server has no media root configured: stream the file instead")
    if not requested or "\x00" in requested:
        raise MediaAccessDenied(f"invalid media path {requested!r}")
    base = os.path.realpath(root)
    real = os.path.realpath(os.path.join(base, requested))
    if not _inside(base, real):
        raise MediaAccessDenied(f"{requested!r} lies outside the media root")
    if not os.path.isfile(real):
        raise FileNotFoundError(f"{requested!r}: no such file under the media root")
    fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        opened = os.path.realpath(f"/proc/self/fd/{fd}") if os.path.isdir("/proc/self/fd") else real
        if not _inside(base, opened):
            raise MediaAccessDenied(f"{requested!r} lies outside the media root")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
