"""The detector export (torchvision Faster R-CNN -> ONNX with RPN proposals and detections) and its runtime.

No detector weights ship with inserve, so the export is checked with a RANDOM INITIALISATION (seeded, heads
spread so that scores do not tie); it detects nothing meaningful, but torch and ONNX Runtime must agree
on it, at the export's input size and at another one.
"""

from pathlib import Path

import numpy as np
import pytest
from photos import encode, photo

from inserve.engines import EngineOptions
from inserve.server.config import DetectorConfig, ImageConfig, RegionRecipeConfig, ServerConfig
from inserve.server.detector import Detector, detector_file
from inserve.server.instance_search import InstanceSearch
from inserve.server.recipes import RecipeUnavailable
from inserve.server.search import SearchOptions

pytest.importorskip("torchvision")

NAME = "fasterrcnn_mobilenet_v3_large_fpn"  # the smaller of the two: its export takes about 15 s
RESNET = "fasterrcnn_resnet50_fpn"


def _export(name: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from inserve.export.detector import export_detector

    return export_detector(name, tmp_path_factory.mktemp("detector"), random_init=True, check=False)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export(NAME, tmp_path_factory)


@pytest.fixture(scope="module")
def resnet_exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export(RESNET, tmp_path_factory)


def test_refuses_without_weights() -> None:
    from inserve.export.backbones import WeightsError
    from inserve.export.detector import load_detector

    with pytest.raises(WeightsError, match="no detector weights ship"):
        load_detector(NAME, None, False, 512, 1024, 0.05)
    with pytest.raises(WeightsError, match="not found"):
        load_detector(NAME, "/nonexistent/weights.pth", False, 512, 1024, 0.05)


@pytest.mark.parametrize(("fixture", "name"), [("exported", NAME), ("resnet_exported", RESNET)])
def test_graph_checks_and_matches_torch_at_two_sizes(request: pytest.FixtureRequest, fixture: str, name: str) -> None:
    from inserve.export.checks import check_graph
    from inserve.export.detector import PARITY_SIZES, DetectorGraph, detector_parity, load_detector

    exported = request.getfixturevalue(fixture)
    check_graph(exported)
    model, source = load_detector(name, None, True, 512, 1024, 0.05)
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


def test_detector_recipes_use_the_detector_boxes_when_one_is_configured(
    exported: Path, models_dir: Path, tmp_path: Path
) -> None:
    """With a (random) detector, deepvision re-ranks over its RPN proposals and deep_region crops its
    detections, and hits say so; what they find means nothing with random weights."""
    config = ServerConfig(
        data_dir=tmp_path,
        models=models_dir,
        recipes=("deepvision", "deep_region"),
        image=ImageConfig(long_side=256),
        detector=DetectorConfig(path=exported.parent, proposals=20),
        regions=RegionRecipeConfig(deep_region_source="detector"),
    )
    core = InstanceSearch(config)
    try:
        assert core.unavailable == {}
        for name in ("coffee", "astronaut"):
            core.index_image(name, encode(photo(name)))
        assert core.index.space("deepvision", "region") is not None
        query = encode(photo("coffee"))
        hits = core.search(query, None, 2, "deepvision")  # its defaults: re-rank the top 100, QE 5
        assert {h.image.external_id for h in hits} == {"coffee", "astronaut"}
        assert all(h.region_source == "detector_rpn" and h.box is not None for h in hits)
        hits = core.search(query, None, 2, "deep_region", SearchOptions(query_expansion=0, rerank_top=2))
        assert all(h.region_source == "detector" and h.box is not None for h in hits)
    finally:
        core.close()
