"""DASR and DASR* regions from one back-propagation of the union of their seeds equal each kind alone, and a
pipeline batch described by recipes of both kinds runs the back-propagation once."""

from pathlib import Path

import numpy as np
from photos import photo
from PIL import Image

from inserve.engines import EngineOptions
from inserve.server.config import DasrConfig, ImageConfig, ServerConfig
from inserve.server.models import ModelBundle
from inserve.server.pipeline import DescribeJob, Pipeline
from inserve.server.recipes import build_recipes
from inserve.server.stages.dasr import dasr_region_sets, dasr_regions
from inserve.server.stages.peaks import above_mean, local_maxima, mean_activation


def test_union_back_propagation_equals_each_kind_alone(models_dir: Path) -> None:
    config = ServerConfig(models=models_dir, image=ImageConfig(long_side=192), engine=EngineOptions(device="cpu"))
    models = ModelBundle.open(models_dir, config.backbone, config.engine)
    pipeline = Pipeline(models, {}, config.image)
    batch = pipeline.features([pipeline.prepare(Image.fromarray(photo(name))) for name in ("coffee", "chelsea")])
    stride, dasr = 8, DasrConfig(seeds_per_run=16)
    args = (models.backprop(stride), stride, batch.pixels, batch.maps["feat"], batch.sizes)
    together = dasr_region_sets(*args, ("dasr", "dasr_star"), dasr)
    for kind in ("dasr", "dasr_star"):
        alone = dasr_regions(*args, kind, dasr)
        assert len(together[kind]) == len(alone) == 2
        for got, expected in zip(together[kind], alone):
            assert len(expected.boxes) > 0
            np.testing.assert_allclose(got.boxes, expected.boxes, atol=1e-3)
            np.testing.assert_array_equal(got.scores, expected.scores)


def test_a_batch_described_with_both_kinds_back_propagates_once(models_dir: Path) -> None:
    config = ServerConfig(models=models_dir, image=ImageConfig(long_side=192), engine=EngineOptions(device="cpu"))
    models = ModelBundle.open(models_dir, config.backbone, config.engine)
    pipeline = Pipeline(models, build_recipes(("dasr", "dasr_star", "gem"), config), config.image)
    inp = pipeline.prepare(Image.fromarray(photo("coffee")))
    activation = mean_activation(pipeline.features([inp]).maps["feat"][0])
    union = {tuple(p) for p in local_maxima(activation)} | {tuple(p) for p in above_mean(activation)}
    engine = models.backprop(models.default_stop_stride)
    runs = []
    original = engine.run
    engine.run = lambda *args, **kwargs: runs.append(1) or original(*args, **kwargs)
    (described,) = pipeline.run([DescribeJob(inp)])
    assert set(described) == {"dasr", "dasr_star", "gem"}
    assert len(described["dasr"].regions.boxes) > 0 and len(described["dasr_star"].regions.boxes) > 0
    assert len(runs) == -(-len(union) // config.dasr.seeds_per_run)  # one pass over the union of the seeds
