"""Crop-and-re-embed (seed 002, DESIGN.md stage 3): regions cut out of an image's network pixels, resized to
a long side of their own and run through the backbone again, so that each region is described by what is
inside it only (pooling a box of the image's maps lets the context in through the receptive field).

Crops keep their aspect ratio and have sides on the network's grid, so at a long side L they fall into a
handful of shapes; crops of one shape run as one batch, unpadded, and each crop's vector does not depend on
the crops it ran with.
"""

from __future__ import annotations

from collections import defaultdict
from itertools import pairwise

import numpy as np
from PIL import Image

from inserve.server.imaging import network_size
from inserve.server.models import ModelBundle
from inserve.server.recipes.base import FeatureBatch
from inserve.server.stages.pooling import gem

CROPS_PER_RUN = 16


def expand_boxes(boxes: np.ndarray, margin: float, width: int, height: int) -> np.ndarray:
    """Boxes (N, 4) grown by `margin` times their width / height on every side, clipped to the image."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    size = np.concatenate([boxes[:, 2:] - boxes[:, :2]] * 2, axis=1)
    grown = boxes + margin * size * np.array([-1, -1, 1, 1], dtype=np.float32)
    return np.clip(grown, 0, [width, height, width, height]).astype(np.float32)


def crop_bounds(box: np.ndarray, width: int, height: int) -> tuple[int, int, int, int]:
    """The whole pixels (x1, y1, x2, y2) a crop of `box` takes from a width x height image: at least one."""
    x1, y1 = int(np.clip(np.floor(box[0]), 0, width - 1)), int(np.clip(np.floor(box[1]), 0, height - 1))
    x2, y2 = int(np.clip(np.ceil(box[2]), x1 + 1, width)), int(np.clip(np.ceil(box[3]), y1 + 1, height))
    return x1, y1, x2, y2


def boxes_from_crop(boxes: np.ndarray, box: np.ndarray, crop: np.ndarray, width: int, height: int) -> np.ndarray:
    """Boxes (N, 4) in the pixels of `crop` (3, h, w), the crop_image of `box` of a width x height image, in
    that image's pixels."""
    x1, y1, x2, y2 = crop_bounds(box, width, height)
    scale = np.array([(x2 - x1) / crop.shape[2], (y2 - y1) / crop.shape[1]] * 2, dtype=np.float32)
    return (np.asarray(boxes, np.float32).reshape(-1, 4) * scale + np.array([x1, y1, x1, y1], np.float32)).astype(
        np.float32
    )


def crop_image(pixels: np.ndarray, box: np.ndarray, long_side: int, multiple: int) -> np.ndarray:
    """The box of a (3, H, W) 0..255 image as an image of its own (3, h, w): long side `long_side`, sides a
    multiple of `multiple`, bicubic."""
    _, height, width = pixels.shape
    x1, y1, x2, y2 = crop_bounds(box, width, height)
    patch = np.clip(pixels[:, y1:y2, x1:x2], 0, 255).round().astype(np.uint8).transpose(1, 2, 0)
    picture = Image.fromarray(np.ascontiguousarray(patch))
    size = network_size(picture.width, picture.height, long_side, multiple)
    return np.asarray(picture.resize(size, Image.BICUBIC), dtype=np.float32).transpose(2, 0, 1).copy()


def low_resolution_view(pixels: np.ndarray, box: np.ndarray, side: int, long_side: int, multiple: int) -> np.ndarray:
    """The box of a (3, H, W) image as `crop_image` gives it, after the box is first reduced to a long side of
    `side` pixels: how a small instance of it looks among the index's crops (few pixels, upscaled)."""
    small = crop_image(pixels, box, side, 1)
    return crop_image(small, np.array([0, 0, small.shape[2], small.shape[1]], np.float32), long_side, multiple)


def embed_images(models: ModelBundle, images: list[np.ndarray], p: float = 3.0) -> np.ndarray:
    """GeM (p) of the `feat` map of each (3, h, w) image -> (N, C); images of one shape share a run."""
    by_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, image in enumerate(images):
        by_shape[image.shape].append(i)
    out = np.zeros((len(images), models.layer("feat").channels), dtype=np.float32)
    for indices in by_shape.values():
        for start in range(0, len(indices), CROPS_PER_RUN):
            chunk = indices[start : start + CROPS_PER_RUN]
            feats = models.features(np.stack([images[i] for i in chunk]))["feat"]
            for i, feat in zip(chunk, feats):
                out[i] = gem(feat, p)
    return out


def crops_of(pixels: np.ndarray, boxes: np.ndarray, long_side: int, multiple: int, margin: float) -> list[np.ndarray]:
    """An image's boxes (network pixels) grown by `margin` and cropped as embed_crops crops them."""
    grown = expand_boxes(boxes, margin, pixels.shape[2], pixels.shape[1])
    return [crop_image(pixels, box, long_side, multiple) for box in grown]


def embed_crops(
    models: ModelBundle, images: list[np.ndarray], boxes: list[np.ndarray], long_side: int, margin: float = 0.0
) -> list[np.ndarray]:
    """Each image's boxes (network pixels, margin added) cropped, re-embedded and GeM-pooled -> per image
    (n_i, C), all crops of all images batched together."""
    crops = []
    for pixels, image_boxes in zip(images, boxes):
        crops += crops_of(pixels, image_boxes, long_side, models.size_multiple, margin)
    vectors = embed_images(models, crops) if crops else np.zeros((0, models.layer("feat").channels), np.float32)
    bounds = np.cumsum([0, *(len(b) for b in boxes)])
    return [vectors[a:b] for a, b in pairwise(bounds)]


def covers(pixels: np.ndarray, box: np.ndarray | None) -> bool:
    """True when a box (None = the whole image) covers a (3, H, W) image to within a pixel."""
    return box is None or bool(np.all(np.abs(np.asarray(box) - [0, 0, pixels.shape[2], pixels.shape[1]]) < 1.0))


def crop_batch(batch: FeatureBatch, box: np.ndarray | None, long_side: int) -> FeatureBatch:
    """The box of a single-image batch as an image of its own, through the backbone (a query box treated as
    a whole image by recipes that find regions inside the query); the batch itself when the box covers it."""
    pixels = batch.inputs[0].pixels
    if covers(pixels, box):
        return batch
    crop = crop_image(pixels, box, long_side, batch.models.size_multiple)
    return FeatureBatch.run(batch.models, crop[None])
