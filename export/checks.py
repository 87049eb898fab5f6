"""Graph checks run after every export: the ONNX checker and torch vs ONNX Runtime parity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn


def check_graph(path: Path) -> None:
    onnx.checker.check_model(str(path), full_check=True)


def onnx_outputs(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def parity(module: nn.Module, args: tuple[torch.Tensor, ...], path: Path) -> float:
    """Largest |torch - ONNX Runtime| over all outputs, relative to each output's largest magnitude."""
    with torch.no_grad():
        expected = module(*args)
    expected = expected if isinstance(expected, tuple) else (expected,)
    names = [i.name for i in ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_inputs()]
    got = onnx_outputs(path, {n: a.numpy() for n, a in zip(names, args)})
    worst = 0.0
    for e, g in zip(expected, got):
        e = e.numpy()
        if e.dtype.kind in "iu":
            if not np.array_equal(e, g):
                return float("inf")
            continue
        scale = max(float(np.abs(e).max()), 1e-30)
        worst = max(worst, float(np.abs(e - g).max()) / scale)
    return worst
