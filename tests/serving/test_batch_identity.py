"""An image's vectors do not depend on the images it is batched with: alone or in a batch of its bucket,
through the pipeline or the shared dynamic batcher, they agree within float tolerance."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from media import jpeg, resized
from servers import BACKBONE, LONG_SIDE
from skimage import data

from inserve.server.config import BatcherConfig, ImageConfig, ServerConfig
from inserve.server.instance_search import InstanceSearch
from inserve.server.pipeline import DescribeJob, QueryJob

RTOL, ATOL = 1e-4, 1e-4  # float32 engine runs at batch 1 vs batch N
BOX_ATOL = 0.5  # pixels


@pytest.fixture(scope="module")
def core(models_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    config = ServerConfig(
        data_dir=tmp_path_factory.mktemp("identity"),
        models=models_dir,
        backbone=BACKBONE,
        recipes=("dasr_star", "gem"),
        image=ImageConfig(long_side=LONG_SIDE),
        batcher=BatcherConfig(max_batch=4, max_delay_ms=200),
    )
    service = InstanceSearch(config)
    yield service
    service.close()


def landscape_images(core: InstanceSearch) -> list:
    """Four photos of two shapes that all go to the 4:3 bucket (three of them padded)."""
    photos = [data.coffee(), data.chelsea(), resized(data.astronaut(), (512, 384)), data.rocket()]
    inputs = [core.load(jpeg(p)) for p in photos]
    assert len({core.pipeline.bucket(inp) for inp in inputs}) == 1
    assert len({inp.pixels.shape for inp in inputs}) > 1
    return inputs


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        (va,), (vb,) = a[name].vectors, b[name].vectors
        np.testing.assert_allclose(va.raw, vb.raw, rtol=RTOL, atol=ATOL, err_msg=name)
        assert (va.boxes is None) == (vb.boxes is None)
        if va.boxes is not None:
            np.testing.assert_allclose(va.boxes, vb.boxes, atol=BOX_ATOL, err_msg=name)
            np.testing.assert_allclose(va.scores, vb.scores, rtol=RTOL, atol=ATOL, err_msg=name)


def test_describing_alone_or_in_a_batch_gives_the_same_vectors_and_boxes(core: InstanceSearch) -> None:
    inputs = landscape_images(core)
    alone = [core.pipeline.run([DescribeJob(inp)])[0] for inp in inputs]
    together = core.pipeline.run([DescribeJob(inp) for inp in inputs])
    assert all(len(a["dasr_star"].vectors[0].raw) > 0 for a in alone)
    for a, t in zip(alone, together):
        assert_same(a, t)


def test_query_vectors_do_not_depend_on_the_batch_either(core: InstanceSearch) -> None:
    inputs = landscape_images(core)
    box = (50.0, 40.0, 250.0, 200.0)
    job = core.pipeline.query_job(inputs[1], box, "dasr_star")
    assert isinstance(job, QueryJob) and job.box is not None
    (alone,) = core.pipeline.run([job])
    mixed = core.pipeline.run([DescribeJob(inputs[0]), job, DescribeJob(inputs[2])])
    np.testing.assert_allclose(mixed[1].raw, alone.raw, rtol=RTOL, atol=ATOL)
    assert set(mixed[0]) == set(mixed[2]) == {"dasr_star", "gem"}


def test_the_shared_batcher_batches_concurrent_work_with_the_same_results(core: InstanceSearch) -> None:
    inputs = landscape_images(core)
    alone = [core.pipeline.run([DescribeJob(inp)])[0] for inp in inputs]
    before = sum(n for size, n in core.batcher.batch_sizes.items() if size > 1)
    futures = core.submit_describe(inputs)  # submitted together: one batch of 4 (max_batch 4)
    for a, future in zip(alone, futures):
        assert_same(a, future.result(60))
    assert sum(n for size, n in core.batcher.batch_sizes.items() if size > 1) == before + 1


def test_padding_is_cropped_off_every_map(core: InstanceSearch) -> None:
    wide = core.load(jpeg(resized(data.astronaut(), (512, 192))))  # 256x96 in the 16:9 bucket (128x256)
    batch = core.pipeline.features([wide])
    assert batch.pixels.shape == (1, 3, 128, 256)
    assert (batch.pixels[0, :, 96:, :] == core.models.pad_value.reshape(3, 1, 1)).all()
    for name in ("feat", "desc"):
        stride = core.models.layer(name).stride
        assert batch.maps[name][0].shape[1:] == (96 // stride, 256 // stride)
    (described,) = core.pipeline.run([DescribeJob(wide)])
    boxes = described["dasr_star"].regions.boxes
    assert len(boxes) > 0 and (boxes[:, 3] <= 192 + 1e-3).all()
