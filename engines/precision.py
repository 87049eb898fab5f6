"""Precision for TensorRT builds: the fp16 copy of a graph that strongly typed networks need, and the images
an int8 build is calibrated on.

TensorRT 10 takes reduced precision as builder flags on a weakly typed network (BuilderFlag.FP16 / INT8).
Strongly typed networks, which TensorRT 10 offers and later releases make the only kind (the flags are gone),
compute in the types the graph itself declares, so fp16 there means building from a copy of the graph whose
weights and operations are fp16, its inputs and outputs staying fp32 (casts at the edges): what
`fp16_graph` writes, with onnxruntime's own converter. int8 calibration follows TensorRT's entropy calibrator:
batches of real inputs, prepared as the server prepares them (`calibration_batches`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from inserve.engines.plan_cache import file_sha256, write_plan

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")  # of folders of images


def fp16_graph(onnx_path: Path, out_dir: Path) -> Path:
    """The graph converted to compute in fp16 with fp32 inputs and outputs, written once under `out_dir` (named
    by the source's sha256, so a re-exported graph gets a new copy). Needs the `onnx` package."""
    try:
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16
    except ImportError as exc:
        raise RuntimeError("an fp16 graph for a strongly typed TensorRT network needs the onnx package") from exc
    onnx_path = Path(onnx_path)
    target = Path(out_dir) / f"{onnx_path.stem}.fp16.{file_sha256(onnx_path)[:16]}.onnx"
    if target.is_file():
        return target
    half = convert_float_to_float16(onnx.load(str(onnx_path)), keep_io_types=True)
    write_plan(target, half.SerializeToString())  # atomically, as plans are
    return target


def calibration_images(folder: Path) -> list[Path]:
    """The images of a calibration folder (recursively), in name order so that every build sees the same."""
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under the calibration folder {folder}")
    return files


def calibration_digest(folder: Path) -> str:
    """sha256 over the calibration images' contents: a plan calibrated on other images is another plan."""
    digest = hashlib.sha256()
    for path in calibration_images(folder):
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()


def calibration_batches(
    folder: Path, prepare: Callable[[bytes], np.ndarray], batch: int, limit: int = 512
) -> Iterator[np.ndarray]:
    """(B, 3, H, W) float32 batches of at most `limit` calibration images, each made by `prepare` (encoded
    bytes -> (3, H, W) network input in one bucket shape, as the server feeds the graph). The last batch is
    dropped when short: TensorRT's calibrator takes full batches."""
    files = calibration_images(folder)[:limit]
    for start in range(0, len(files) - batch + 1, batch):
        yield np.stack([prepare(path.read_bytes()) for path in files[start : start + batch]]).astype(np.float32)
