"""The exported graphs of one backbone, opened as engines, and what its manifest says about them."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np

from inserve.engines import Engine, EngineOptions, open_engine
from inserve.engines.plan_cache import file_sha256

MANIFEST_FORMAT = 1  # of manifest.json: what `inserve export` writes and the server reads


class ModelsError(RuntimeError):
    """The models directory is missing, incomplete or does not match its manifest."""


def locate_manifest(models: Path, backbone: str) -> Path:
    """`models` is what `inserve export --out` wrote (holding NAME/manifest.json) or NAME itself."""
    for candidate in (Path(models) / backbone / "manifest.json", Path(models) / "manifest.json"):
        if candidate.is_file():
            return candidate
    raise ModelsError(
        f"no exported {backbone} under {models}: run `inserve export --backbone {backbone} --out {models}`"
    )


class ModelBundle:
    """Backbone, CAM head and DASR back-propagation engines; the latter two open on first use."""

    def __init__(self, manifest_path: Path, options: EngineOptions = EngineOptions(), verify: bool = True) -> None:
        self.directory = manifest_path.parent
        self.manifest = json.loads(manifest_path.read_text())
        if self.manifest.get("format") != MANIFEST_FORMAT:
            raise ModelsError(
                f"{manifest_path}: manifest format {self.manifest.get('format')}, expected {MANIFEST_FORMAT}"
            )
        self.options = options
        self.verify = verify
        self._engines: dict[str, Engine] = {}
        self._lock = threading.Lock()
        self.backbone = self._engine(self.manifest["graphs"]["backbone"])

    @classmethod
    def open(cls, models: Path, backbone: str, options: EngineOptions = EngineOptions()) -> ModelBundle:
        return cls(locate_manifest(models, backbone), options)

    @property
    def name(self) -> str:
        return self.manifest["backbone"]

    @property
    def size_multiple(self) -> int:
        return int(self.manifest["input"]["size_multiple"])

    @property
    def pad_value(self) -> np.ndarray:
        """Per-channel pixel value that the graph's normalisation maps to zero: what padding is filled with."""
        normalization = self.manifest.get("normalization", {})
        if not normalization.get("inside_graph", False):
            return np.zeros(3, dtype=np.float32)
        return np.asarray(normalization["mean"], dtype=np.float32)

    def layer(self, which: str) -> dict:
        """`feat` or `desc`: name, stride, channels."""
        return self.manifest["layers"][which]

    @property
    def stop_strides(self) -> list[int]:
        return sorted(int(s) for s in self.manifest["graphs"]["dasr_backprop"]["strides"])

    @property
    def default_stop_stride(self) -> int:
        return int(self.manifest["graphs"]["dasr_backprop"]["default_stride"])

    def _engine(self, entry: dict) -> Engine:
        with self._lock:
            if entry["file"] not in self._engines:
                path = self.directory / entry["file"]
                if not path.is_file():
                    raise ModelsError(f"{path} is missing; export the backbone again")
                if self.verify and file_sha256(path) != entry["sha256"]:
                    raise ModelsError(f"{path} does not match the sha256 in its manifest; export it again")
                self._engines[entry["file"]] = open_engine(path, self.options)
            return self._engines[entry["file"]]

    def features(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """pixels (B, 3, H, W) 0..255 -> feat, desc, logits."""
        return self.backbone.run({"image": pixels})

    def features_and_moments(self, pixels: np.ndarray, stride: int, functionals: np.ndarray) -> dict[str, np.ndarray]:
        """`features` and the DASR moments to `stride` of every `feat` cell, from one forward pass (the moments
        graph outputs the backbone's maps too): what indexing with the adjoint regions runs."""
        return self.moments(stride).run({"image": pixels, "functionals": functionals})

    def cams(self, feat: np.ndarray, logits: np.ndarray) -> dict[str, np.ndarray]:
        """-> classes (B, N), scores (B, N), cams (B, N, h, w) of the top-N classes."""
        return self._engine(self.manifest["graphs"]["cam_head"]).run({"feat": feat, "logits": logits})

    def backprop(self, stride: int) -> Engine:
        """DASR's top-down pass to `stride`: one map per seed."""
        return self._engine(self._dasr_entry("dasr_backprop", stride))

    def moments(self, stride: int) -> Engine:
        """Its adjoint to `stride`: the moments of every cell's map at once, with the backbone's maps."""
        entry = self._dasr_entry("dasr_moments", stride)
        if "feat" not in entry["outputs"]:
            raise ModelsError(f"{entry['file']} predates the backbone's maps among its outputs; export it again")
        return self._engine(entry)

    def _dasr_entry(self, graph: str, stride: int) -> dict:
        strides = self.manifest["graphs"].get(graph, {}).get("strides", {})
        if str(stride) not in strides:
            raise ModelsError(
                f"{graph} to stride {stride} was not exported (have {sorted(int(s) for s in strides)}); "
                f"export again with --dasr-strides {stride}"
            )
        return strides[str(stride)]
