"""Shape buckets: which bucket an image goes to, padding, and cropping maps back to the image's cells."""

from __future__ import annotations

import numpy as np
import pytest

from inserve.server.stages.buckets import bucket_shapes, choose_bucket, crop_map, pad_batch, parse_ratio, valid_cells

SHAPES = bucket_shapes(("4:3", "1:1", "3:4"), 512, 32)


def test_buckets_are_landscape_portrait_square_on_the_grid() -> None:
    assert SHAPES == [(384, 512), (512, 384), (512, 512)]
    assert bucket_shapes(("16:9",), 320, 32) == [(192, 320)]  # 180 rounds to the 32-grid


@pytest.mark.parametrize(
    ("size", "bucket"),
    [
        ((384, 512), (384, 512)),  # 4:3 fits exactly
        ((288, 512), (384, 512)),  # 16:9 padded into landscape
        ((64, 512), (384, 512)),  # a strip
        ((416, 512), (512, 512)),  # wider than 4:3 is taller: square
        ((512, 352), (512, 384)),  # portrait
        ((512, 512), (512, 512)),
    ],
)
def test_each_image_goes_to_the_smallest_bucket_holding_it(size: tuple[int, int], bucket: tuple[int, int]) -> None:
    assert choose_bucket(*size, SHAPES) == bucket


def test_an_image_no_bucket_holds_keeps_its_own_shape() -> None:
    assert choose_bucket(512, 480, [(384, 512)]) == (512, 480)


def test_ratios_are_checked() -> None:
    assert parse_ratio("16:9") == (16, 9)
    for bad in ("16x9", "0:1", "a:b", "4:3:2"):
        with pytest.raises(ValueError):
            parse_ratio(bad)


def test_padding_fills_with_the_mean_and_keeps_images_top_left() -> None:
    a = np.full((3, 2, 3), 10.0, dtype=np.float32)
    b = np.full((3, 4, 2), 20.0, dtype=np.float32)
    batch = pad_batch([a, b], (4, 4), np.array([127.0, 128.0, 129.0]))
    assert batch.shape == (2, 3, 4, 4)
    assert (batch[0, :, :2, :3] == 10).all() and (batch[1, :, :, :2] == 20).all()
    assert (batch[0, 1, 2:, :] == 128).all() and (batch[0, 2, :, 3] == 129).all() and (batch[1, 0, :, 2:] == 127).all()


def test_maps_are_cropped_to_the_cells_of_the_image() -> None:
    assert valid_cells((288, 512), 32) == (9, 16)
    assert valid_cells((100, 70), 32) == (4, 3)  # a cell that sees any image pixel counts
    padded = np.arange(2 * 12 * 16, dtype=np.float32).reshape(2, 12, 16)  # stride 32 over a 384x512 input
    cropped = crop_map(padded, (288, 480), 384)
    assert cropped.shape == (2, 9, 15)
    assert (cropped == padded[:, :9, :15]).all()
