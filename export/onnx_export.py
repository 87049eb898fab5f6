"""`inserve export`: write a backbone's ONNX graphs and the manifest the runtime reads."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import onnx
import torch
from torch import nn

from inserve.engines.plan_cache import file_sha256
from inserve.export.backbones import load_backbone
from inserve.export.checks import check_graph, parity
from inserve.export.graphs import BackboneGraph, CamHead, DasrBackprop, DasrMoments
from inserve.export.programs import Program
from inserve.server.manifest import (
    DASR_GRAPHS,
    GraphEntry,
    InputSpec,
    Layer,
    Manifest,
    Normalization,
    StridedGraphs,
)
from inserve.server.stages.shapes import MOMENTS

log = logging.getLogger(__name__)

OPSET = 18
DEFAULT_STOP_STRIDE = 8


@dataclass(frozen=True)
class ExportOptions:
    desc: str | None = None  # descriptor layer; None = the backbone's default
    cam_top_n: int = 64
    dasr_strides: Sequence[int] = (DEFAULT_STOP_STRIDE,)
    default_stop_stride: int = DEFAULT_STOP_STRIDE
    check: bool = True  # run onnx.checker and a torch-vs-ONNX Runtime parity check on each graph


def _export(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str], dynamic: dict) -> None:
    log.info("exporting %s", path.name)
    torch.onnx.export(
        module.eval(),
        args,
        str(path),
        input_names=inputs,
        output_names=outputs,
        dynamic_shapes=dynamic,
        dynamo=True,
        opset_version=OPSET,
        external_data=False,
        verbose=False,
    )


def _graph_entry(path: Path, inputs: list[str], outputs: list[str], **extra: object) -> GraphEntry:
    """A graph's manifest entry: its file, sha256, inputs and outputs, and each input's dims as the ONNX file
    declares them (ints, or the names of dynamic dims), from which TensorRT profiles are derived."""
    return GraphEntry(path.name, file_sha256(path), tuple(inputs), tuple(outputs), input_dims(path), **extra)


def input_dims(path: Path) -> dict[str, tuple[int | str, ...]]:
    graph = onnx.load(str(path), load_external_data=False).graph
    return {
        i.name: tuple(d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim)
        for i in graph.input
        if i.name not in {init.name for init in graph.initializer}
    }


def export_backbone(
    name: str,
    out_dir: Path,
    weights: str | Path | None = None,
    random_init: bool = False,
    options: ExportOptions = ExportOptions(),
) -> Path:
    """Export DIR/NAME/{backbone,cam_head,dasr_backprop*}.onnx and manifest.json; returns the manifest path."""
    loaded = load_backbone(name, weights, random_init)
    program = loaded.spec.program(loaded.model, options.desc or loaded.spec.default_desc)
    if program.desc not in program.strides:
        raise ValueError(f"{name} has no layer {program.desc!r}")
    strides = sorted(set(options.dasr_strides) | {options.default_stop_stride})
    unknown = [s for s in strides if s not in program.stage_points]
    if unknown:
        raise ValueError(
            f"{name} cannot stop the DASR pass at strides {unknown}; it can at {sorted(program.stage_points)}"
        )
    target = Path(out_dir) / name
    target.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    m = program.size_multiple
    sample = torch.rand(2, 3, 2 * m, 3 * m) * 255
    batch, rows, cols = (
        torch.export.Dim("batch", min=1),
        torch.export.Dim("rows", min=1),
        torch.export.Dim("cols", min=1),
    )
    image_dims = {0: batch, 2: m * rows, 3: m * cols}

    backbone = BackboneGraph(loaded, program).eval()
    path = target / "backbone.onnx"
    _export(backbone, (sample,), path, ["image"], ["feat", "desc", "logits"], {"image": image_dims})
    with torch.no_grad():
        feat, desc, logits = backbone(sample)
    graphs = {"backbone": _graph_entry(path, ["image"], ["feat", "desc", "logits"])}

    top_n = min(options.cam_top_n, logits.shape[1])
    cam = CamHead(loaded, top_n).eval()
    path = target / "cam_head.onnx"
    feat_dims = {0: batch, 2: torch.export.Dim("feat_rows", min=1), 3: torch.export.Dim("feat_cols", min=1)}
    _export(
        cam,
        (feat, logits),
        path,
        ["feat", "logits"],
        ["classes", "scores", "cams"],
        {"feat": feat_dims, "logits": {0: batch}},
    )
    graphs["cam_head"] = _graph_entry(path, ["feat", "logits"], ["classes", "scores", "cams"], top_n=top_n)

    seeds = (torch.tensor([[[0, 0], [1, 2]], [[0, 1], [1, 1]]]), torch.tensor([[1.0, 0.5], [2.0, 0.0]]))
    seed_dims = {0: batch, 1: torch.export.Dim("seeds", min=1)}
    dasr_inputs = ["image", "seed_yx", "seed_value"]
    moment_inputs = ["image", "functionals"]
    moment_outputs = ["feat", "desc", "logits", "moments"]  # the backbone's maps from the same forward pass
    checks = [(backbone, (sample,), graphs["backbone"]), (cam, (feat, logits), graphs["cam_head"])]
    dasr = {}
    for graph in DASR_GRAPHS:
        files = {}
        for stride in strides:
            if graph == "dasr_backprop":
                module, inputs, outputs = DasrBackprop(loaded, program, stride).eval(), dasr_inputs, ["maps"]
                args = (sample, *seeds)
                dims = {"image": image_dims, "seed_yx": seed_dims, "seed_value": seed_dims}
            else:
                module, inputs, outputs = DasrMoments(loaded, program, stride).eval(), moment_inputs, moment_outputs
                functionals = torch.rand(2, len(MOMENTS), sample.shape[2] // stride, sample.shape[3] // stride)
                args = (sample, functionals)  # K is fixed: DasrMoments keeps one tensor per functional
                cells = {2: (m // stride) * rows, 3: (m // stride) * cols}
                dims = {"image": image_dims, "functionals": {0: batch, **cells}}
            file = f"{graph}.onnx" if stride == options.default_stop_stride else f"{graph}_s{stride}.onnx"
            path = target / file
            _export(module, args, path, inputs, outputs, dims)
            files[stride] = _graph_entry(path, inputs, outputs, stop_layer=program.stage_points[stride])
            checks.append((module, args, files[stride]))
        dasr[graph] = StridedGraphs(options.default_stop_stride, files)

    manifest = Manifest(
        backbone=name,
        weights_source=loaded.weights_source,
        opset=OPSET,
        exporter=f"torch.onnx dynamo, torch {torch.__version__}",
        input=InputSpec("image", "NCHW", "RGB", (0, 255), m),
        normalization=Normalization(tuple(loaded.spec.mean), tuple(loaded.spec.std), inside_graph=True),
        feat=_layer(program, program.feat, feat),
        desc=_layer(program, program.desc, desc),
        stage_points=dict(program.stage_points),
        num_classes=int(logits.shape[1]),
        graphs=graphs,
        dasr=dasr,
    )
    if options.check:
        for module, args, entry in checks:
            check_graph(target / entry.file)
            error = parity(module, args, target / entry.file)
            manifest = manifest.with_entry(replace(entry, parity_max_abs_error=error))
    manifest_path = target / "manifest.json"
    manifest.write(manifest_path)
    return manifest_path


def _layer(program: Program, name: str, maps: torch.Tensor) -> Layer:
    return Layer(name, program.strides[name], int(maps.shape[1]))
