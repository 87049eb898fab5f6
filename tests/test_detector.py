"""The detector export (torchvision Faster R-CNN -> ONNX with RPN proposals and detections) and its runtime.

No detector weights ship with inserve, so the export is checked with a RANDOM INITIALISATION (seeded, heads
spread so that scores do not tie); it detects nothing meaningful, but torch and ONNX Runtime must agree
on it, at the export's input size and at another one.
"""

from pathlib import Path

import numpy as np
import pytest

from inserve.engines import EngineOptions
from inserve.server.config import DetectorConfig
from inserve.server.detector import Detector, detector_file
from inserve.server.recipes import RecipeUnavailable

pytest.importorskip("torchvision")

NAME = "fasterrcnn_mobilenet_v3_large_fpn"  # the smaller of the two: the export takes about a minute


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from inserve.export.detector import export_detector

    return export_detector(NAME, tmp_path_factory.mktemp("detector"), random_init=True, check=False)


def test_refuses_without_weights() -> None:
    from inserve.export.backbones import WeightsError
    from inserve.export.detector import load_detector

    with pytest.raises(WeightsError, match="no detector weights ship"):
        load_detector(NAME, None, False, 512, 1024, 0.05)
    with pytest.raises(WeightsError, match="not found"):
        load_detector(NAME, "/nonexistent/weights.pth", False, 512, 1024, 0.05)


def test_graph_checks_and_matches_torch_at_two_sizes(exported: Path) -> None:
    from inserve.export.checks import check_graph
    from inserve.export.detector import PARITY_SIZES, DetectorGraph, detector_parity, load_detector

    check_graph(exported)
    model, source = load_detector(NAME, None, True, 512, 1024, 0.05)
    assert source.startswith("random-init")
    graph = DetectorGraph(model).eval()
    for size in PARITY_SIZES:
        # top-10 proposals and detections within a pixel, top scores within 1e-2 (measured: ~0.06 px)
        assert detector_parity(graph, exported, size) < 1.0


def test_runtime_detector_reads_the_export(exported: Path) -> None:
    detector = Detector(DetectorConfig(path=exported.parent), EngineOptions(device="cpu"))
    detector.check()
    assert detector_file(exported.parent) == exported
    found = detector.detect(np.random.default_rng(0).uniform(0, 255, (3, 256, 320)).astype(np.float32))
    assert found.proposals.shape[1] == 4 and len(found.proposals) == len(found.proposal_scores) > 0
    assert np.all(np.diff(found.proposal_scores) <= 1e-6)  # by objectness
    assert np.all(found.proposals[:, 2] <= 320 + 1e-3) and np.all(found.proposals[:, 3] <= 256 + 1e-3)
    assert len(found.boxes) == len(found.scores) == len(found.labels)


def test_missing_detector_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(RecipeUnavailable, match="no detector is configured"):
        Detector(DetectorConfig(), EngineOptions()).check()
    missing = tmp_path / "fasterrcnn_resnet50_fpn" / "detector.onnx"
    with pytest.raises(RecipeUnavailable, match=str(missing)):
        Detector(DetectorConfig(path=missing), EngineOptions()).check()
