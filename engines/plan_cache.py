"""On-disk cache of serialized TensorRT plans.

A plan is only valid for the graph, TensorRT version and GPU model it was built for, and it takes
from seconds to minutes to build; the file name carries a hash of everything that invalidates a plan,
so a stale plan is never loaded and a fresh one is built once per combination. Writes go through a
temporary file and `os.replace`, so a crash or a concurrent builder never leaves a torn plan behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from inserve.engines.base import ShapeRange

_CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    """sha256 (hex) of a file's bytes, read in chunks (ONNX files run to hundreds of MB)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def plan_key(
    onnx_path: Path,
    *,
    tensorrt_version: str,
    gpu_name: str,
    precision: str,
    profiles: Sequence[Mapping[str, ShapeRange]] | None,
    dla_core: int | None = None,
    calibration: str | None = None,
) -> str:
    """sha256 (hex) over the ONNX file's bytes and every build setting that changes the plan (`calibration`:
    the digest of the int8 calibration images)."""
    settings = {
        "onnx_sha256": file_sha256(onnx_path),
        "tensorrt": tensorrt_version,
        "gpu": gpu_name,
        "precision": precision,
        "profiles": [
            {name: [list(shape) for shape in shapes] for name, shapes in profile.items()} for profile in profiles or ()
        ],
        "dla_core": dla_core,
        "calibration": calibration,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def plan_path(cache_dir: Path, onnx_path: Path, key: str) -> Path:
    """Where the plan for `key` lives; the graph's stem keeps the cache folder readable."""
    return Path(cache_dir) / f"{Path(onnx_path).stem}.{key}.plan"


def read_plan(path: Path) -> bytes | None:
    """The cached plan, or None when there is none yet."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def write_plan(path: Path, plan: bytes) -> None:
    """Store `plan` at `path` atomically: readers see either no file or the whole plan."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(plan)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
