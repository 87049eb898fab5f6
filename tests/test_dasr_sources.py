"""DASR and DASR* regions from one back-propagation of the union of their seeds equal each kind alone, and a
pipeline batch described by recipes of both kinds runs the back-propagation once; the `adjoint` and `hybrid`
region modes give the boxes their definitions say, from the explicit maps."""

import functools
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from photos import photo
from PIL import Image

from inserve.engines import EngineOptions
from inserve.server.config import DasrConfig, ImageConfig, ServerConfig
from inserve.server.instance_search import InstanceSearch
from inserve.server.models import ModelBundle, ModelsError
from inserve.server.pipeline import DescribeJob, Pipeline
from inserve.server.recipes import build_recipes
from inserve.server.stages.buckets import valid_cells
from inserve.server.stages.dasr import DasrEngines, backpropagate_seeds, dasr_region_sets, dasr_regions, find_seeds
from inserve.server.stages.nms import nms
from inserve.server.stages.peaks import above_mean, local_maxima, mean_activation
from inserve.server.stages.shapes import map_boxes, map_moments, moment_boxes


def two_photo_batch(models_dir: Path, long_side: int = 192) -> tuple[ModelBundle, object]:
    """coins (160 x 192) and astronaut (192 x 192) in one padded batch: coins' last rows are padding."""
    config = ServerConfig(models=models_dir, image=ImageConfig(long_side=long_side), engine=EngineOptions(device="cpu"))
    models = ModelBundle.open(models_dir, config.backbone, config.engine)
    pipeline = Pipeline(models, {}, config.image)
    return models, pipeline.features([pipeline.prepare(Image.fromarray(photo(n))) for n in ("coins", "astronaut")])


def test_union_back_propagation_equals_each_kind_alone(models_dir: Path) -> None:
    models, batch = two_photo_batch(models_dir)
    stride, dasr = 8, DasrConfig(mode="exact", seeds_per_run=16)
    args = (DasrEngines(models.backprop(stride), None), stride, batch.pixels, batch.maps["feat"], batch.sizes)
    together = dasr_region_sets(*args, ("dasr", "dasr_star"), dasr)
    for kind in ("dasr", "dasr_star"):
        alone = dasr_regions(*args, kind, dasr)
        assert len(together[kind]) == len(alone) == 2
        for got, expected in zip(together[kind], alone):
            assert len(expected.boxes) > 0
            np.testing.assert_allclose(got.boxes, expected.boxes, atol=1e-3)
            np.testing.assert_array_equal(got.scores, expected.scores)


@pytest.mark.parametrize("mode", ["exact", "adjoint"])
def test_a_batch_described_with_both_kinds_back_propagates_once(models_dir: Path, mode: str) -> None:
    """exact: one back-propagation of the union of DASR's and DASR*'s seeds; adjoint: one moments run, no maps."""
    config = ServerConfig(
        models=models_dir,
        image=ImageConfig(long_side=192),
        engine=EngineOptions(device="cpu"),
        dasr=DasrConfig(mode=mode),
    )
    models = ModelBundle.open(models_dir, config.backbone, config.engine)
    recipes = build_recipes(("dasr", "dasr_star", "gem"), config)
    pipeline = Pipeline(models, recipes, config.image, dasr=config.dasr)
    inp = pipeline.prepare(Image.fromarray(photo("coffee")))
    activation = mean_activation(pipeline.features([inp]).maps["feat"][0])
    union = {tuple(p) for p in local_maxima(activation)} | {tuple(p) for p in above_mean(activation)}
    (separately,) = Pipeline(models, recipes, config.image).run([DescribeJob(inp)])  # backbone, then the DASR graph
    stride = models.default_stop_stride
    runs = {"backbone": [], "backprop": [], "moments": []}
    for graph in runs:
        engine = models.backbone if graph == "backbone" else getattr(models, graph)(stride)
        engine.run = functools.partial(counted, engine.run, runs[graph])
    (described,) = pipeline.run([DescribeJob(inp)])
    assert set(described) == {"dasr", "dasr_star", "gem"}
    assert len(described["dasr"].regions.boxes) > 0 and len(described["dasr_star"].regions.boxes) > 0
    if mode == "exact":
        assert len(runs["backprop"]) == -(-len(union) // config.dasr.seeds_per_run)  # one pass over the union
        assert (len(runs["backbone"]), len(runs["moments"])) == (1, 0)
    else:  # one forward pass: the moments graph gives the backbone's maps too
        assert (len(runs["backbone"]), len(runs["backprop"]), len(runs["moments"])) == (0, 0, 1)
    for name, vectors in described.items():
        np.testing.assert_allclose(vectors.regions.boxes, separately[name].regions.boxes, atol=1e-2)
        for got, expected in zip(vectors.vectors, separately[name].vectors, strict=True):
            np.testing.assert_allclose(got.raw, expected.raw, atol=1e-5)


def counted(run, calls: list, *args, **kwargs):
    calls.append(1)
    return run(*args, **kwargs)


def explicit_maps(models: ModelBundle, batch, stride: int, seeds: list[np.ndarray]) -> list[np.ndarray]:
    """Each image's exact maps of its seeds, cropped to its own cells."""
    maps = backpropagate_seeds(models.backprop(stride), batch.pixels, seeds, per_run=64)
    return [m[:, : valid_cells(size, stride)[0], : valid_cells(size, stride)[1]] for m, size in zip(maps, batch.sizes)]


def test_adjoint_boxes_are_the_weighted_moment_boxes_of_the_exact_maps(models_dir: Path) -> None:
    """adjoint mode, padded batch of two photos of different shapes: every region is the `moment_boxes` box of its
    seed's exact map (cropped to the image's own cells), kept by NMS in activation order."""
    models, batch = two_photo_batch(models_dir)
    stride = 8
    config = DasrConfig(mode="adjoint", sigmas=1.5)
    engines = DasrEngines(models.backprop(stride), models.moments(stride))
    got = dasr_regions(engines, stride, batch.pixels, batch.maps["feat"], batch.sizes, "dasr_star", config)
    assert batch.sizes[0] != batch.sizes[1]
    seeds = [find_seeds("dasr_star", mean_activation(f), config) for f in batch.maps["feat"]]
    for regions, maps, positions, feat, (height, width) in zip(
        got, explicit_maps(models, batch, stride, seeds), seeds, batch.maps["feat"], batch.sizes
    ):
        boxes, valid = moment_boxes(map_moments(maps), stride, config.sigmas, width, height)
        scores = mean_activation(feat)[positions[:, 0], positions[:, 1]]
        keep = nms(boxes[valid], scores[valid], config.nms_iou)
        assert len(keep) > 1
        np.testing.assert_allclose(regions.boxes, boxes[valid][keep], atol=1e-2)
        np.testing.assert_array_equal(regions.scores, scores[valid][keep])


def test_hybrid_regions_are_exact_boxes_of_the_adjoint_survivors(models_dir: Path) -> None:
    models, batch = two_photo_batch(models_dir)
    stride = 8
    engines = DasrEngines(models.backprop(stride), models.moments(stride))
    args = (engines, stride, batch.pixels, batch.maps["feat"], batch.sizes, "dasr_star")
    adjoint = dasr_regions(*args, DasrConfig(mode="adjoint"))
    hybrid = dasr_regions(*args, DasrConfig(mode="hybrid"))
    seeds = [find_seeds("dasr_star", mean_activation(f), DasrConfig()) for f in batch.maps["feat"]]
    for a, h, maps, positions, feat, (height, width) in zip(
        adjoint, hybrid, explicit_maps(models, batch, stride, seeds), seeds, batch.maps["feat"], batch.sizes
    ):
        activation = mean_activation(feat)
        survivors = [int(np.flatnonzero(activation[positions[:, 0], positions[:, 1]] == s)[0]) for s in a.scores]
        exact, valid = map_boxes(maps[survivors], stride, 0.1, "moments", width, height)
        scores = a.scores[valid]
        keep = nms(exact[valid], scores, 0.3)
        assert 0 < len(h.boxes) <= len(a.boxes)
        np.testing.assert_allclose(h.boxes, exact[valid][keep], atol=1e-2)
        np.testing.assert_array_equal(h.scores, scores[keep])


def older_export(models_dir: Path, tmp_path: Path, edit) -> Path:
    """The models directory as an older export wrote it: the same files (linked), the manifest changed by `edit`."""
    old = tmp_path / "models" / "efficientnet_lite0"
    old.mkdir(parents=True)
    for file in (models_dir / "efficientnet_lite0").iterdir():
        if file.name != "manifest.json":
            (old / file.name).symlink_to(file)
    manifest = json.loads((models_dir / "efficientnet_lite0" / "manifest.json").read_text())
    edit(manifest["graphs"])
    (old / "manifest.json").write_text(json.dumps(manifest))
    return old.parent


def test_an_export_without_the_adjoint_graph_is_refused_at_start(models_dir: Path, tmp_path: Path) -> None:
    """An export from before dasr_moments.onnx existed: the server refuses to start in adjoint mode, saying what to
    do, and starts in exact mode."""
    models = older_export(models_dir, tmp_path, lambda graphs: graphs.pop("dasr_moments"))
    config = ServerConfig(models=models, data_dir=tmp_path / "data", engine=EngineOptions(device="cpu"))
    with pytest.raises(ModelsError, match=r"dasr_moments to stride 8 was not exported.*export again"):
        InstanceSearch(config)
    InstanceSearch(replace(config, dasr=DasrConfig(mode="exact"), data_dir=tmp_path / "exact")).close()


def test_a_moments_graph_without_the_backbones_maps_is_refused_at_start(models_dir: Path, tmp_path: Path) -> None:
    """An export from before the moments graph gave the backbone's maps too: refused in adjoint mode."""

    def moments_only(graphs: dict) -> None:
        for entry in graphs["dasr_moments"]["strides"].values():
            entry["outputs"] = ["moments"]

    models = older_export(models_dir, tmp_path, moments_only)
    config = ServerConfig(models=models, data_dir=tmp_path / "data", engine=EngineOptions(device="cpu"))
    with pytest.raises(ModelsError, match=r"dasr_moments.*predates the backbone's maps.*export it again"):
        InstanceSearch(config)
