"""Crop-and-re-embed (deep_region, dasr_star_crops): box arithmetic by hand, and crop vectors that do not
depend on the other crops of their run."""

from pathlib import Path

import numpy as np
from photos import photo

from inserve.engines import EngineOptions
from inserve.server.models import ModelBundle
from inserve.server.recipes.crops import (
    boxes_from_crop,
    covers,
    crop_image,
    embed_crops,
    embed_images,
    expand_boxes,
    low_resolution_view,
)
from inserve.server.stages.pooling import gem


def test_expand_boxes_grows_by_a_fraction_of_each_side_and_clips() -> None:
    boxes = np.array([[10, 10, 30, 40], [0, 0, 100, 50]], dtype=np.float32)
    # 20 x 30 box, margin 0.1: 2 px left/right, 3 px up/down; the whole-image box is clipped back to itself
    np.testing.assert_array_equal(expand_boxes(boxes, 0.1, 100, 50), [[8, 7, 32, 43], [0, 0, 100, 50]])
    # margin 0.5 reaches past the top: clipped to 0
    np.testing.assert_array_equal(expand_boxes(boxes[:1], 0.5, 100, 50), [[0, 0, 40, 50]])
    np.testing.assert_array_equal(expand_boxes(boxes, 0.0, 100, 50), boxes)


def test_crop_image_keeps_the_aspect_on_the_network_grid() -> None:
    pixels = np.zeros((3, 100, 200), dtype=np.float32)
    pixels[0, 10:50, 20:100] = 255  # a red 80 x 40 block
    crop = crop_image(pixels, np.array([20, 10, 100, 50]), long_side=64, multiple=32)
    assert crop.shape == (3, 32, 64)  # 80 x 40 -> long side 64, short side 32
    np.testing.assert_allclose(crop[0], 255, atol=1)
    np.testing.assert_allclose(crop[1:], 0, atol=1)


def test_boxes_found_in_a_crop_map_back_to_the_pixels_it_was_cut_from() -> None:
    """The crop of (10.5, 20.2, 110.7, 70) takes pixels 10..111 x 20..70 (whole pixels), resized to 64 x 32: its
    whole box is those pixels, its left half the left half of them."""
    pixels = np.zeros((3, 100, 200), dtype=np.float32)
    box = np.array([10.5, 20.2, 110.7, 70.0], np.float32)
    crop = crop_image(pixels, box, long_side=64, multiple=32)
    assert crop.shape == (3, 32, 64)
    found = np.array([[0, 0, 64, 32], [0, 0, 32, 32]], np.float32)
    np.testing.assert_allclose(boxes_from_crop(found, box, crop, 200, 100), [[10, 20, 111, 70], [10, 20, 60.5, 70]])


def test_the_low_resolution_view_has_the_crops_shape_and_loses_the_fine_detail() -> None:
    """A 1-pixel checkerboard seen at a long side of 16: the crop's shape, grey (its detail gone), where the
    crop as given keeps most of its contrast; a flat image stays flat."""
    board = (np.indices((120, 160)).sum(axis=0) % 2 * 255).astype(np.float32)
    pixels = np.stack([board] * 3)
    box = np.array([0, 0, 160, 120], np.float32)
    sharp = crop_image(pixels, box, 128, 32)
    low = low_resolution_view(pixels, box, 16, 128, 32)
    assert low.shape == sharp.shape == (3, 96, 128)
    assert low.std() < 0.1 * sharp.std() and abs(low.mean() - 127.5) < 10
    flat = np.full((3, 120, 160), 77.0, np.float32)
    np.testing.assert_allclose(low_resolution_view(flat, box, 16, 128, 32), 77.0, atol=0.5)


def test_covers() -> None:
    pixels = np.zeros((3, 48, 64), dtype=np.float32)
    assert (
        covers(pixels, None) and covers(pixels, np.array([0, 0, 64, 48])) and covers(pixels, np.array([0.4, 0, 64, 48]))
    )
    assert not covers(pixels, np.array([0, 0, 60, 48]))


def test_crop_vectors_do_not_depend_on_their_company(models_dir: Path) -> None:
    models = ModelBundle.open(models_dir, "efficientnet_lite0", EngineOptions(device="cpu"))
    a = photo("astronaut").transpose(2, 0, 1).astype(np.float32)[:, :256, :256]
    b = photo("coffee").transpose(2, 0, 1).astype(np.float32)[:, :200, :300]
    boxes_a = np.array([[0, 0, 128, 128], [64, 32, 256, 96]], dtype=np.float32)
    boxes_b = np.array([[10, 10, 110, 210]], dtype=np.float32)  # reaches past the image: clipped
    together = embed_crops(models, [a, b], [boxes_a, boxes_b], long_side=128)
    alone = embed_crops(models, [b], [boxes_b], long_side=128)
    assert [v.shape for v in together] == [(2, 1280), (1, 1280)]
    np.testing.assert_allclose(together[1], alone[0], rtol=1e-4, atol=1e-5)
    # the first crop is the top-left 128 x 128 of a: a 128 x 128 image of its own, GeM of its feat map
    direct = gem(models.features(np.ascontiguousarray(a[None, :, :128, :128]))["feat"][0])
    np.testing.assert_allclose(together[0][0], direct, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(embed_images(models, [a[:, :128, :128]])[0], direct, rtol=1e-4, atol=1e-5)
