"""The exported graphs of one backbone, opened as engines, and what its manifest says about them."""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from inserve.engines import Engine, EngineOptions, open_engine
from inserve.engines.devices import builds_tensorrt
from inserve.engines.plan_cache import file_sha256
from inserve.engines.precision import calibration_batches
from inserve.engines.profiles import ShapePlan, graph_profiles
from inserve.server.config import ImageConfig
from inserve.server.errors import ModelsError
from inserve.server.imaging import decode_image, prepare
from inserve.server.manifest import GraphEntry, Layer, Manifest, StridedGraphs
from inserve.server.stages.buckets import bucket_shapes


def locate_manifest(models: Path, backbone: str) -> Path:
    """`models` is what `inserve export --out` wrote (holding NAME/manifest.json) or NAME itself."""
    for candidate in (Path(models) / backbone / "manifest.json", Path(models) / "manifest.json"):
        if candidate.is_file():
            return candidate
    raise ModelsError(
        f"no exported {backbone} under {models}: run `inserve export --backbone {backbone} --out {models}`"
    )


@dataclass(frozen=True)
class ServingShapes:
    """What the server feeds the graphs: images padded into its buckets (BatcherConfig.buckets at
    ImageConfig.long_side), batches of 1 to max_batch, DASR seeds 1 to max_seeds a run. TensorRT builds one
    optimisation profile per bucket from it."""

    buckets: tuple[str, ...]
    long_side: int
    max_batch: int
    max_seeds: int


def graph_options(options: EngineOptions, entry: GraphEntry, plan: ShapePlan | None) -> EngineOptions:
    """The engine options of one graph (its manifest entry). Where the graph becomes a TensorRT engine, and
    unless the options give profiles, one optimisation profile per bucket of `plan`, derived from the graph's
    input dims (engines/profiles.py); int8 only for graphs whose one input is the image (the DASR graphs
    back-propagate through every layer and build in fp16 instead)."""
    if options.precision == "int8" and entry.inputs != ("image",):
        options = replace(options, precision="fp16", calibration=None)
    if options.profiles is not None or plan is None or not builds_tensorrt(options.device):
        return options
    if entry.input_dims is None:
        raise ModelsError(
            f"{entry.file}: the manifest predates input dims, which TensorRT profiles are derived from; "
            "export the backbone again"
        )
    return replace(options, profiles=graph_profiles(entry.input_dims, plan, entry.file))


class ModelBundle:
    """Backbone, CAM head and DASR back-propagation engines; the latter two open on first use, the backbone at
    once (a server that cannot run it fails at start) unless `open_backbone` is false (build-engines, which imports
    plans first). With `shapes`, each graph that may run on TensorRT gets the optimisation profiles of what the
    server feeds it."""

    def __init__(
        self,
        manifest_path: Path,
        options: EngineOptions = EngineOptions(),
        verify: bool = True,
        shapes: ServingShapes | None = None,
        open_backbone: bool = True,
    ) -> None:
        self.directory = manifest_path.parent
        self.manifest = Manifest.load(manifest_path)
        self.options = options
        self.verify = verify
        self.shapes = shapes
        self._engines: dict[str, Engine] = {}
        self._lock = threading.Lock()
        if open_backbone:
            self._engine(self.manifest.graphs["backbone"])

    @classmethod
    def open(
        cls,
        models: Path,
        backbone: str,
        options: EngineOptions = EngineOptions(),
        shapes: ServingShapes | None = None,
        open_backbone: bool = True,
    ) -> ModelBundle:
        return cls(locate_manifest(models, backbone), options, shapes=shapes, open_backbone=open_backbone)

    @functools.cached_property
    def backbone(self) -> Engine:
        """The backbone's engine; an attribute once opened, so that runs take no lock."""
        return self._engine(self.manifest.graphs["backbone"])

    @property
    def name(self) -> str:
        return self.manifest.backbone

    @property
    def size_multiple(self) -> int:
        return self.manifest.input.size_multiple

    @property
    def pad_value(self) -> np.ndarray:
        """Per-channel pixel value that the graph's normalisation maps to zero: what padding is filled with."""
        normalization = self.manifest.normalization
        if not normalization.inside_graph:
            return np.zeros(3, dtype=np.float32)
        return np.asarray(normalization.mean, dtype=np.float32)

    def layer(self, which: str) -> Layer:
        """`feat` or `desc`: name, stride, channels."""
        return {"feat": self.manifest.feat, "desc": self.manifest.desc}[which]

    @property
    def stop_strides(self) -> list[int]:
        return sorted(self._dasr("dasr_backprop").strides)

    @property
    def default_stop_stride(self) -> int:
        return self._dasr("dasr_backprop").default_stride

    def _engine(self, entry: GraphEntry) -> Engine:
        with self._lock:
            if entry.file not in self._engines:
                path = self.directory / entry.file
                if not path.is_file():
                    raise ModelsError(f"{path} is missing; export the backbone again")
                if self.verify and file_sha256(path) != entry.sha256:
                    raise ModelsError(f"{path} does not match the sha256 in its manifest; export it again")
                options = self.graph_options(entry)
                calibration = self._calibration(options) if options.precision == "int8" else None
                self._engines[entry.file] = open_engine(path, options, calibration)
            return self._engines[entry.file]

    def entries(self) -> list[GraphEntry]:
        return self.manifest.entries()

    def open_all(self) -> Iterator[str]:
        """Open (build, for TensorRT) every graph in turn, yielding each file name once it is ready."""
        for entry in self.entries():
            self._engine(entry)
            yield entry.file

    def import_plan(self, graph: str, plan: Path) -> Path:
        """Put a plan built elsewhere (trtexec) into the engine cache as the plan of `graph` (a file name of the
        bundle) under the options it would be built with; returns where it went."""
        from inserve.engines.tensorrt_engine import import_plan

        entry = next((e for e in self.entries() if e.file == graph), None)
        if entry is None:
            raise ModelsError(f"no graph {graph!r} in {self.directory}; have {[e.file for e in self.entries()]}")
        return import_plan(self.directory / graph, plan, self.graph_options(entry), entry.inputs)

    def shape_plan(self) -> ShapePlan:
        shapes = self.shapes
        if shapes is None:
            raise ModelsError("the serving shapes are needed to derive TensorRT profiles")
        return ShapePlan(
            tuple(bucket_shapes(shapes.buckets, shapes.long_side, self.size_multiple)),
            self.size_multiple,
            self.manifest.feat.stride,
            shapes.max_batch,
            shapes.max_seeds,
        )

    def graph_options(self, entry: GraphEntry) -> EngineOptions:
        return graph_options(self.options, entry, None if self.shapes is None else self.shape_plan())

    def _calibration(self, options: EngineOptions) -> list[np.ndarray]:
        """int8 calibration batches (max_batch images each) from the calibration folder in the first bucket's
        shape (the calibration profile's), each image resized to fill it, then prepared as the server prepares
        images: only the activations' ranges matter to calibration, not the aspect."""
        plan = self.shape_plan()
        height, width = plan.buckets[0]
        config = ImageConfig(long_side=max(height, width))

        def network_input(data: bytes) -> np.ndarray:
            image = decode_image(data, config).resize((width, height), Image.BICUBIC)
            return prepare(image, config.long_side, self.size_multiple).pixels

        return list(calibration_batches(options.calibration, network_input, plan.max_batch))

    def features(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """pixels (B, 3, H, W) 0..255 -> feat, desc, logits."""
        return self.backbone.run({"image": pixels})

    def features_and_moments(self, pixels: np.ndarray, stride: int, functionals: np.ndarray) -> dict[str, np.ndarray]:
        """`features` and the DASR moments to `stride` of every `feat` cell, from one forward pass (the moments
        graph outputs the backbone's maps too): what indexing with the adjoint regions runs."""
        return self.moments(stride).run({"image": pixels, "functionals": functionals})

    def cams(self, feat: np.ndarray, logits: np.ndarray) -> dict[str, np.ndarray]:
        """-> classes (B, N), scores (B, N), cams (B, N, h, w) of the top-N classes."""
        return self._engine(self.manifest.graphs["cam_head"]).run({"feat": feat, "logits": logits})

    def backprop(self, stride: int) -> Engine:
        """DASR's top-down pass to `stride`: one map per seed."""
        return self._engine(self._dasr_entry("dasr_backprop", stride))

    def moments(self, stride: int) -> Engine:
        """Its adjoint to `stride`: the moments of every cell's map at once, with the backbone's maps."""
        entry = self._dasr_entry("dasr_moments", stride)
        if "feat" not in entry.outputs:
            raise ModelsError(f"{entry.file} predates the backbone's maps among its outputs; export it again")
        return self._engine(entry)

    def _dasr(self, graph: str) -> StridedGraphs:
        if graph not in self.manifest.dasr:
            raise ModelsError(f"{self.directory} holds no {graph} graph; export the backbone again")
        return self.manifest.dasr[graph]

    def _dasr_entry(self, graph: str, stride: int) -> GraphEntry:
        strides = self.manifest.dasr[graph].strides if graph in self.manifest.dasr else {}
        if stride not in strides:
            raise ModelsError(
                f"{graph} to stride {stride} was not exported (have {sorted(strides)}); "
                f"export again with --dasr-strides {stride}"
            )
        return strides[stride]
