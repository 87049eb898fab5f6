"""TensorRT optimisation profiles derived from the graphs' input dims and the server's shapes: hand-checked for
every graph of the real EfficientNet-Lite0 export, one profile per bucket, and the per-graph engine options."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import onnxruntime as ort
import pytest

from inserve.engines import EngineOptions
from inserve.engines.devices import builds_tensorrt
from inserve.engines.onnxruntime_engine import TENSORRT_EP
from inserve.engines.profiles import ShapePlan, covering_profile, graph_profiles
from inserve.server.models import ModelBundle, ModelsError, ServingShapes, graph_options, locate_manifest

SHAPES = ServingShapes(buckets=("16:9", "1:1"), long_side=256, max_batch=4, max_seeds=48)
# at long side 256 on the 32-pixel grid: 16:9 -> 256x128 (rows 4, cols 8), 1:1 -> 256x256 (8 x 8)
BUCKETS = ((128, 256), (256, 256))


@pytest.fixture(scope="module")
def bundle(models_dir: Path) -> ModelBundle:
    return ModelBundle(locate_manifest(models_dir, "efficientnet_lite0"), EngineOptions(device="cpu"), shapes=SHAPES)


def graph(bundle: ModelBundle, file: str) -> dict:
    return next(e for e in bundle.entries() if e.file == file)


def test_the_export_records_each_inputs_dims(bundle: ModelBundle) -> None:
    assert graph(bundle, "backbone.onnx").input_dims == {"image": ("batch", 3, "32*rows", "32*cols")}
    assert graph(bundle, "cam_head.onnx").input_dims == {
        "feat": ("batch", 1280, "feat_rows", "feat_cols"),
        "logits": ("batch", 1000),
    }
    moments = graph(bundle, "dasr_moments.onnx")  # stop stride 8: the functionals are stride-8 maps
    assert moments.input_dims["functionals"] == ("batch", 5, "4*rows", "4*cols")  # one tensor per moment inside
    assert graph(bundle, "dasr_backprop.onnx").input_dims["seed_yx"] == ("batch", "seeds", 2)


def test_every_graph_gets_one_profile_per_bucket_at_the_shapes_the_server_feeds(bundle: ModelBundle) -> None:
    plan = bundle.shape_plan()
    assert plan.buckets == BUCKETS and (plan.size_multiple, plan.feat_stride) == (32, 32)
    backbone = graph_profiles(graph(bundle, "backbone.onnx").input_dims, plan)
    assert backbone == (
        {"image": ((1, 3, 128, 256), (4, 3, 128, 256), (4, 3, 128, 256))},
        {"image": ((1, 3, 256, 256), (4, 3, 256, 256), (4, 3, 256, 256))},
    )
    cam = graph_profiles(graph(bundle, "cam_head.onnx").input_dims, plan)
    assert cam[0] == {
        "feat": ((1, 1280, 4, 8), (4, 1280, 4, 8), (4, 1280, 4, 8)),
        "logits": ((1, 1000), (4, 1000), (4, 1000)),
    }
    moments = graph_profiles(graph(bundle, "dasr_moments.onnx").input_dims, plan)
    assert moments[1]["functionals"] == ((1, 5, 32, 32), (4, 5, 32, 32), (4, 5, 32, 32))  # 256 / 8 cells, 5 moments
    backprop = graph_profiles(graph(bundle, "dasr_backprop.onnx").input_dims, plan)
    assert backprop[0]["seed_yx"] == ((1, 1, 2), (4, 48, 2), (4, 48, 2))
    assert backprop[0]["seed_value"] == ((1, 1), (4, 48), (4, 48))


def test_the_profile_that_holds_a_batch_is_found_and_others_are_not() -> None:
    plan = ShapePlan(BUCKETS, 32, 32, max_batch=4, max_seeds=8)
    profiles = graph_profiles({"image": ["batch", 3, "32*rows", "32*cols"]}, plan)
    assert covering_profile(profiles, {"image": (3, 3, 128, 256)}) == 0
    assert covering_profile(profiles, {"image": (1, 3, 256, 256)}) == 1
    assert covering_profile(profiles, {"image": (5, 3, 256, 256)}) is None  # beyond max_batch
    assert covering_profile(profiles, {"image": (1, 3, 192, 256)}) is None  # no bucket has this shape


def test_a_dim_no_rule_covers_and_off_grid_buckets_are_refused() -> None:
    plan = ShapePlan(BUCKETS, 32, 32, max_batch=4, max_seeds=8)
    with pytest.raises(ValueError, match=r"g input 'x': no rule derives a TensorRT profile for the dim 'height'"):
        graph_profiles({"x": ["batch", "height"]}, plan, "g")
    with pytest.raises(ValueError, match=r"dim 'k'; a bundle exported by another inserve version .* export"):
        graph_profiles({"functionals": ["batch", "k", "4*rows", "4*cols"]}, plan, "dasr_moments")
    with pytest.raises(ValueError, match=r"bucket 100x256 is not on the 32-pixel grid"):
        ShapePlan(((100, 256),), 32, 32, 4, 8)


def test_graph_options_derive_profiles_on_tensorrt_devices_only(bundle: ModelBundle) -> None:
    entry, plan = graph(bundle, "backbone.onnx"), bundle.shape_plan()
    assert graph_options(EngineOptions(device="cpu"), entry, plan).profiles is None  # the CPU needs none
    for device in ("tensorrt", "tensorrt-native"):
        derived = graph_options(EngineOptions(device=device), entry, plan)
        assert derived.profiles == graph_profiles(entry.input_dims, plan)
    auto = graph_options(EngineOptions(device="auto"), entry, plan).profiles  # profiles where the TensorRT EP is
    assert (auto is not None) == builds_tensorrt("auto") == (TENSORRT_EP in ort.get_available_providers())
    given = EngineOptions(device="tensorrt", profiles={"image": ((1, 3, 32, 32), (1, 3, 64, 64), (1, 3, 64, 64))})
    assert graph_options(given, entry, plan).profiles == given.profiles  # explicit profiles are kept
    old = replace(entry, input_dims=None)  # exported before input dims were recorded
    with pytest.raises(ModelsError, match=r"predates input dims.*export the backbone again"):
        graph_options(EngineOptions(device="tensorrt"), old, plan)
    if not builds_tensorrt("auto"):  # an older export still serves on the CPU
        assert graph_options(EngineOptions(device="auto"), old, plan).profiles is None


def test_int8_applies_to_the_image_graph_and_the_dasr_graphs_build_in_fp16(bundle: ModelBundle, tmp_path: Path) -> None:
    int8 = EngineOptions(device="tensorrt-native", precision="int8", calibration=tmp_path)
    plan = bundle.shape_plan()
    assert graph_options(int8, graph(bundle, "backbone.onnx"), plan).precision == "int8"
    for file in ("cam_head.onnx", "dasr_moments.onnx", "dasr_backprop.onnx"):
        options = graph_options(int8, graph(bundle, file), plan)
        assert (options.precision, options.calibration) == ("fp16", None)
