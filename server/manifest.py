"""manifest.json, typed: what `inserve export` writes beside the graphs and the server reads, defined once for
both. The file is the contract between them (JSON, so that a bundle can be read without inserve); these
classes are its only reader and writer."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from pathlib import Path

from inserve.server.errors import ModelsError

MANIFEST_FORMAT = 1  # bumped when a reader of the previous format would misread the new one
DASR_GRAPHS = ("dasr_backprop", "dasr_moments")


@dataclass(frozen=True)
class GraphEntry:
    """One ONNX file of the bundle."""

    file: str
    sha256: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    input_dims: dict[str, tuple[int | str, ...]] | None = None  # ints or dynamic dims' names; None: older export
    top_n: int | None = None  # the CAM head: classes kept per image
    stop_layer: str | None = None  # the DASR graphs: where the top-down pass stops
    parity_max_abs_error: float | None = None  # against torch at export, when checked

    def as_json(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}
        data["inputs"], data["outputs"] = list(self.inputs), list(self.outputs)
        if self.input_dims is not None:
            data["input_dims"] = {name: list(dims) for name, dims in self.input_dims.items()}
        return data

    @classmethod
    def from_json(cls, data: dict) -> GraphEntry:
        dims = data.get("input_dims")
        return cls(
            data["file"],
            data["sha256"],
            tuple(data["inputs"]),
            tuple(data["outputs"]),
            None if dims is None else {name: tuple(d) for name, d in dims.items()},
            data.get("top_n"),
            data.get("stop_layer"),
            data.get("parity_max_abs_error"),
        )


@dataclass(frozen=True)
class StridedGraphs:
    """A DASR graph exported once per stop stride."""

    default_stride: int
    strides: dict[int, GraphEntry]

    def as_json(self) -> dict:
        return {
            "default_stride": self.default_stride,
            "strides": {str(s): e.as_json() for s, e in sorted(self.strides.items())},
        }

    @classmethod
    def from_json(cls, data: dict) -> StridedGraphs:
        strides = {int(s): GraphEntry.from_json(e) for s, e in data["strides"].items()}
        return cls(int(data["default_stride"]), strides)


@dataclass(frozen=True)
class Layer:
    name: str
    stride: int
    channels: int


@dataclass(frozen=True)
class InputSpec:
    """The image input: RGB pixels in `range`, NCHW, sides a multiple of `size_multiple`."""

    name: str
    layout: str
    color: str
    range: tuple[float, float]
    size_multiple: int


@dataclass(frozen=True)
class Normalization:
    mean: tuple[float, ...]
    std: tuple[float, ...]
    inside_graph: bool  # the graph normalises; callers feed raw pixels


@dataclass(frozen=True)
class Manifest:
    backbone: str
    weights_source: str
    opset: int
    exporter: str
    input: InputSpec
    normalization: Normalization
    feat: Layer  # the maps pooled into descriptors and seeded by DASR
    desc: Layer
    stage_points: dict[int, str]  # stride -> the layer where DASR may stop at it
    num_classes: int
    graphs: dict[str, GraphEntry]  # "backbone", "cam_head"
    dasr: dict[str, StridedGraphs]  # those of DASR_GRAPHS that were exported

    def entries(self) -> list[GraphEntry]:
        """Every graph of the bundle: backbone, CAM head, and the DASR graphs of each exported stride."""
        return [*self.graphs.values(), *(e for g in self.dasr.values() for _, e in sorted(g.strides.items()))]

    def with_entry(self, entry: GraphEntry) -> Manifest:
        """The manifest with the entry of the same file replaced (export adds parity errors after checking)."""
        graphs = {k: entry if e.file == entry.file else e for k, e in self.graphs.items()}
        dasr = {
            k: replace(g, strides={s: entry if e.file == entry.file else e for s, e in g.strides.items()})
            for k, g in self.dasr.items()
        }
        return replace(self, graphs=graphs, dasr=dasr)

    def as_json(self) -> dict:
        return {
            "format": MANIFEST_FORMAT,
            "backbone": self.backbone,
            "weights_source": self.weights_source,
            "opset": self.opset,
            "exporter": self.exporter,
            "input": {**self.input.__dict__, "range": list(self.input.range)},
            "normalization": {
                "mean": list(self.normalization.mean),
                "std": list(self.normalization.std),
                "inside_graph": self.normalization.inside_graph,
            },
            "layers": {
                "feat": self.feat.__dict__,
                "desc": self.desc.__dict__,
                "stage_points": {str(s): name for s, name in self.stage_points.items()},
            },
            "num_classes": self.num_classes,
            "graphs": {
                **{k: e.as_json() for k, e in self.graphs.items()},
                **{k: g.as_json() for k, g in self.dasr.items()},
            },
        }

    def write(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.as_json(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> Manifest:
        """Raises ModelsError for another format or a manifest that lacks what this one needs."""
        data = json.loads(Path(path).read_text())
        if data.get("format") != MANIFEST_FORMAT:
            raise ModelsError(f"{path}: manifest format {data.get('format')}, expected {MANIFEST_FORMAT}")
        try:
            layers, graphs = data["layers"], data["graphs"]
            inp, norm = data["input"], data["normalization"]
            return cls(
                data["backbone"],
                data.get("weights_source", ""),
                int(data["opset"]),
                data.get("exporter", ""),
                InputSpec(inp["name"], inp["layout"], inp["color"], tuple(inp["range"]), int(inp["size_multiple"])),
                Normalization(tuple(norm["mean"]), tuple(norm["std"]), bool(norm["inside_graph"])),
                Layer(**layers["feat"]),
                Layer(**layers["desc"]),
                {int(s): name for s, name in layers["stage_points"].items()},
                int(data["num_classes"]),
                {k: GraphEntry.from_json(graphs[k]) for k in ("backbone", "cam_head")},
                {k: StridedGraphs.from_json(graphs[k]) for k in DASR_GRAPHS if k in graphs},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelsError(f"{path}: manifest lacks or misstates {exc}; export the backbone again") from exc
