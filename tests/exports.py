"""Session exports for tests (one export per backbone per session; see conftest.py)."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

# Export layout: DIR/NAME/{manifest.json, backbone.onnx, cam_head.onnx, dasr_backprop*.onnx}
LITE0_STRIDES = (4, 8)  # DASR graphs exported for efficientnet_lite0; 8 is the default
RESNET_STRIDE = 4  # the one DASR graph exported for resnet50: its pass crosses every layer type but conv1
VGG_STRIDE = 2  # the one DASR graph exported for vgg16: crosses pool2..pool4 and all convs above pool1
RANDOM_CAM_TOP_N = 8


def export_models(root: Path, name: str, **options: object) -> Path:
    """Export into `root`, or into $INSERVE_TEST_EXPORTS/<options> when that is set and already holds this
    export (for iterating on tests only: a stale export there hides changes to export/)."""
    from inserve.export.onnx_export import ExportOptions, export_backbone

    cache = os.environ.get("INSERVE_TEST_EXPORTS")
    if cache:
        root = Path(cache) / hashlib.sha256(repr(sorted(options.items())).encode()).hexdigest()[:12]
        if (root / name / "manifest.json").is_file():
            return root
    random_init = name != "efficientnet_lite0"
    export_backbone(name, root, random_init=random_init, options=ExportOptions(**options))
    return root


def remove_unless_cached(root: Path) -> None:
    if not os.environ.get("INSERVE_TEST_EXPORTS"):
        shutil.rmtree(root, ignore_errors=True)


def backbone_dir(request: pytest.FixtureRequest, backbone: str) -> Path:
    """DIR/NAME of a backbone's session export, exporting it on first use only."""
    fixture = {"efficientnet_lite0": "lite0_models", "resnet50": "resnet50_models", "vgg16": "vgg16_models"}[backbone]
    return request.getfixturevalue(fixture) / backbone
