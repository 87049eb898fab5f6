"""The optional detector (torchvision Faster R-CNN exported by `inserve export --detector`): RPN proposals
and detections of one image per run. No detector weights ship with inserve, so recipes that need one
report which file is missing instead of failing the service."""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from inserve.engines import Engine, EngineOptions, open_engine
from inserve.server.config import DetectorConfig
from inserve.server.errors import RecipeUnavailable

EXPORT_HINT = (
    "export one with `inserve export --detector fasterrcnn_resnet50_fpn --weights WEIGHTS.pth --out DIR` "
    "(a torchvision state dict; no detector weights ship with inserve) and serve with --detector DIR"
)


@dataclass(frozen=True)
class Detections:
    """Boxes in the input's pixels: RPN proposals by objectness, and final detections by score."""

    proposals: np.ndarray  # (P, 4)
    proposal_scores: np.ndarray  # (P,)
    boxes: np.ndarray  # (D, 4)
    scores: np.ndarray  # (D,)
    labels: np.ndarray  # (D,)


def detector_file(path: Path) -> Path:
    """detector.onnx itself, or the folder `inserve export --detector` wrote (holding it, or one NAME/ that does)."""
    path = Path(path)
    if path.is_dir():
        found = [path / "detector.onnx"] if (path / "detector.onnx").is_file() else sorted(path.glob("*/detector.onnx"))
        return found[0] if len(found) == 1 else path / "detector.onnx"
    return path


class Detector:
    """Opens the configured detector on first use; `check` says why it cannot be used."""

    def __init__(self, config: DetectorConfig, options: EngineOptions) -> None:
        self.config = config
        # the detection graph (NMS, RoIAlign, dynamic sizes) runs on ONNX Runtime, never as a native plan
        self.options = replace(options, device="auto") if options.device == "tensorrt-native" else options
        self._engine: Engine | None = None
        self._lock = threading.Lock()

    @property
    def configured(self) -> bool:
        return self.config.path is not None

    def check(self) -> None:
        if self.config.path is None:
            raise RecipeUnavailable(f"no detector is configured (--detector PATH); {EXPORT_HINT}")
        path = detector_file(self.config.path)
        if not path.is_file():
            raise RecipeUnavailable(f"detector file {path} not found; {EXPORT_HINT}")

    def engine(self) -> Engine:
        with self._lock:
            if self._engine is None:
                self.check()
                self._engine = open_engine(detector_file(self.config.path), self.options)
            return self._engine

    def detect(self, pixels: np.ndarray) -> Detections:
        """pixels (3, H, W) RGB 0..255."""
        out = self.engine().run({"image": np.ascontiguousarray(pixels, dtype=np.float32)})
        return Detections(
            out["proposals"].reshape(-1, 4),
            out["proposal_scores"].reshape(-1),
            out["boxes"].reshape(-1, 4),
            out["scores"].reshape(-1),
            out["labels"].reshape(-1),
        )
