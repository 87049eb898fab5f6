"""torchvision Faster R-CNN -> detector.onnx with the RPN proposals and the final detections as outputs.

No detector weights ship with inserve: the user supplies a torchvision state dict (--weights), or tests
export a seeded random initialisation (--random-init), which detects nothing meaningful.

Detection models go through the legacy TorchScript-tracing exporter (dynamo=False, opset 17):
torchvision's detection code has tracing-aware paths (image sizes and resize factors kept as tensors) so
that one graph serves any input size; the export is checked at a second input size for that reason.
Batch size is 1 (one image per run).
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn
from torchvision.models.detection import transform as detection_transform
from torchvision.models.detection.rpn import concat_box_prediction_layers

from inserve.export.backbones import WeightsError
from inserve.export.checks import check_graph, onnx_outputs

log = logging.getLogger(__name__)

DETECTOR_OPSET = 17
DETECTOR_FORMAT = 1
OUTPUTS = ["proposals", "proposal_scores", "boxes", "scores", "labels"]
PARITY_SIZES = ((320, 448), (384, 288))  # the export size and another one: the graph must follow the input size

DETECTORS: dict[str, Callable[..., nn.Module]] = {
    "fasterrcnn_resnet50_fpn": torchvision.models.detection.fasterrcnn_resnet50_fpn,
    "fasterrcnn_mobilenet_v3_large_fpn": torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn,
}


class DetectorGraph(nn.Module):
    """image (3, H, W) RGB 0..255 -> proposals (P, 4) with objectness (P,), ordered by objectness, and
    detections boxes (D, 4), scores (D,), labels (D,); boxes in the input's pixels."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        original = image.shape[-2:]
        images, _ = self.model.transform([image / 255.0])
        features = self.model.backbone(images.tensors)
        rpn = self.model.rpn
        levels = list(features.values())
        objectness, deltas = rpn.head(levels)
        anchors = rpn.anchor_generator(images, levels)
        per_level = [o[0].shape[0] * o[0].shape[1] * o[0].shape[2] for o in objectness]
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        decoded = rpn.box_coder.decode(deltas.detach(), anchors).view(1, -1, 4)
        proposals, proposal_scores = rpn.filter_proposals(decoded, objectness, images.image_sizes, per_level)
        detections, _ = self.model.roi_heads(features, proposals, images.image_sizes)
        detections = self.model.transform.postprocess(detections, images.image_sizes, [original])
        scaled = detection_transform.resize_boxes(proposals[0], images.image_sizes[0], original)
        found = detections[0]
        return scaled, proposal_scores[0], found["boxes"], found["scores"], found["labels"]


def load_detector(
    name: str, weights: str | Path | None, random_init: bool, min_size: int, max_size: int, score_threshold: float
) -> tuple[nn.Module, str]:
    if name not in DETECTORS:
        raise WeightsError(f"unknown detector {name!r}; choose one of {', '.join(DETECTORS)}")
    if weights is None and not random_init:
        raise WeightsError(
            f"{name} needs a weights file in torchvision's state-dict format (--weights PATH); no detector "
            "weights ship with inserve. Pass --random-init to export untrained weights for testing"
        )
    num_classes = 91
    state = None
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise WeightsError(f"weights file not found: {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]
        num_classes = int(state["roi_heads.box_predictor.cls_score.weight"].shape[0])
    torch.manual_seed(0)
    model = DETECTORS[name](
        weights=None,
        weights_backbone=None,
        num_classes=num_classes,
        min_size=min_size,
        max_size=max_size,
        box_score_thresh=score_threshold,
    )
    if state is not None:
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise WeightsError(
                f"{weights} does not fit {name}: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
            )
        return model.eval(), f"file:{Path(weights).resolve()}"
    _calibrate_batchnorm(model.eval())
    _spread_heads(model)
    return model.eval(), "random-init (torch.manual_seed(0)): not for real search"


def _calibrate_batchnorm(model: nn.Module) -> None:
    """A random model's frozen BatchNorm layers are identities, so activations fade to ~1e-9 within a few
    blocks. Setting each one's statistics from its input on one seeded image (in forward order) keeps the
    activations at unit scale, as trained statistics would."""
    norms = [m for m in model.modules() if isinstance(m, torchvision.ops.FrozenBatchNorm2d | nn.BatchNorm2d)]

    def set_stats(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0]
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        module.running_var.copy_(x.var(dim=(0, 2, 3)) + 1e-5)

    hooks = [m.register_forward_pre_hook(set_stats) for m in norms]
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model([torch.rand(3, 256, 320, generator=generator)])
    for hook in hooks:
        hook.remove()


def _spread_heads(model: nn.Module) -> None:
    """torchvision initialises the RPN and box heads so that every anchor scores sigmoid(0) = 0.5 exactly;
    ties would make the order of proposals arbitrary. Seeded fan-in-scaled weights make a random model's
    scores distinct, so that torch and ONNX Runtime can be compared box by box."""
    generator = torch.Generator().manual_seed(0)
    heads = [model.rpn.head.cls_logits, model.rpn.head.bbox_pred, *model.roi_heads.box_predictor.children()]
    with torch.no_grad():
        for layer in heads:
            fan_in = layer.weight[0].numel()
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) / fan_in**0.5)
            layer.bias.copy_(0.1 * torch.randn(layer.bias.shape, generator=generator))


def export_detector(
    name: str,
    out_dir: Path,
    weights: str | Path | None = None,
    random_init: bool = False,
    min_size: int = 512,
    max_size: int = 1024,
    score_threshold: float = 0.05,
    check: bool = True,
) -> Path:
    """Write DIR/NAME/detector.onnx and detector.json; returns the graph's path."""
    model, source = load_detector(name, weights, random_init, min_size, max_size, score_threshold)
    target = Path(out_dir) / name
    target.mkdir(parents=True, exist_ok=True)
    path = target / "detector.onnx"
    graph = DetectorGraph(model).eval()
    torch.manual_seed(1)
    sample = torch.rand(3, 320, 448) * 255
    log.info("exporting %s", path)
    with torch.no_grad(), warnings.catch_warnings():
        # the tracer's expected notes on torchvision's detection code (shape arithmetic, advanced indexing)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx\..*|torchvision\..*")
        torch.onnx.export(
            graph,
            (sample,),
            str(path),
            input_names=["image"],
            output_names=OUTPUTS,
            dynamic_axes={"image": {1: "height", 2: "width"}, **{o: {0: "n"} for o in OUTPUTS}},
            opset_version=DETECTOR_OPSET,
            dynamo=False,
        )
    info = {
        "format": DETECTOR_FORMAT,
        "detector": name,
        "weights_source": source,
        "opset": DETECTOR_OPSET,
        "exporter": f"torch.onnx (TorchScript tracing, dynamo=False), torch {torch.__version__}",
        "input": {"name": "image", "layout": "CHW", "color": "RGB", "range": [0, 255]},
        "outputs": OUTPUTS,
        "min_size": min_size,
        "max_size": max_size,
        "score_threshold": score_threshold,
        "num_classes": int(model.roi_heads.box_predictor.cls_score.out_features),
    }
    if check:
        check_graph(path)
        info["parity_max_box_error_px"] = max(detector_parity(graph, path, size) for size in PARITY_SIZES)
    (target / "detector.json").write_text(json.dumps(info, indent=2) + "\n")
    return path


PARITY_TOP = 10


def detector_parity(graph: DetectorGraph, path: Path, size: tuple[int, int], seed: int = 2) -> float:
    """torch vs ONNX Runtime on a random image of `size`: for each of torch's top PARITY_TOP proposals and
    detections, the closest ONNX box among its top 2 * PARITY_TOP (largest coordinate difference, pixels);
    returns the worst. Matching, not position: boxes whose scores differ by less than the runtimes' rounding
    may swap ranks. inf when output counts differ or the sorted top scores differ by more than 1e-2."""
    torch.manual_seed(seed)
    image = torch.rand(3, *size) * 255
    with torch.no_grad():
        expected = dict(zip(OUTPUTS, (t.numpy() for t in graph(image))))
    got = dict(zip(OUTPUTS, onnx_outputs(path, {"image": image.numpy()})))
    if any(expected[n].shape != got[n].shape for n in OUTPUTS):
        return float("inf")
    for scores in ("proposal_scores", "scores"):
        e, g = expected[scores][:PARITY_TOP], got[scores][:PARITY_TOP]
        if e.size and np.abs(np.sort(e) - np.sort(g)).max() > 1e-2:
            return float("inf")
    worst = 0.0
    for boxes in ("proposals", "boxes"):
        e, g = expected[boxes][:PARITY_TOP], got[boxes][: 2 * PARITY_TOP]
        if e.size:
            worst = max(worst, float(np.abs(e[:, None, :] - g[None, :, :]).max(axis=2).min(axis=1).max()))
    return worst
