"""Crop-and-re-embed (seed 002) and query crops: cut boxes out of network pixels, resize, run the backbone."""

from __future__ import annotations

import numpy as np
from PIL import Image

from inserve.server.imaging import network_size
from inserve.server.recipes.base import FeatureBatch


def _crop(pixels: np.ndarray, box: np.ndarray) -> Image.Image:
    _, height, width = pixels.shape
    x1, y1 = int(np.clip(np.floor(box[0]), 0, width - 1)), int(np.clip(np.floor(box[1]), 0, height - 1))
    x2, y2 = int(np.clip(np.ceil(box[2]), x1 + 1, width)), int(np.clip(np.ceil(box[3]), y1 + 1, height))
    patch = np.clip(pixels[:, y1:y2, x1:x2], 0, 255).round().astype(np.uint8).transpose(1, 2, 0)
    return Image.fromarray(np.ascontiguousarray(patch))


def warp_crops(pixels: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """Boxes (n, 4) of a (3, H, W) image, each warped to size x size as R-CNN does -> (n, 3, size, size)."""
    out = np.zeros((len(boxes), 3, size, size), dtype=np.float32)
    for i, box in enumerate(boxes):
        out[i] = np.asarray(_crop(pixels, box).resize((size, size), Image.BICUBIC), dtype=np.float32).transpose(2, 0, 1)
    return out


def crop_batch(batch: FeatureBatch, box: np.ndarray, long_side: int) -> FeatureBatch:
    """The box of a single-image batch as an image of its own: long side `long_side`, sides a multiple of
    the network's, through the backbone."""
    patch = _crop(batch.inputs[0].pixels, box)
    size = network_size(patch.width, patch.height, long_side, batch.models.size_multiple)
    pixels = np.asarray(patch.resize(size, Image.BICUBIC), dtype=np.float32).transpose(2, 0, 1)
    return FeatureBatch.run(batch.models, np.ascontiguousarray(pixels)[None])
