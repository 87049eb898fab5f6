"""Shape buckets: a few padded network input shapes, so that images of different sizes share a batch.

Every image is resized as before (long side fixed, sides on the network's grid) and placed in the
top-left corner of the smallest bucket that holds it, whether it runs alone or batched, so its maps
do not depend on its company. The padding is filled with the normalisation mean (zero after the
graph's own normalisation, as at the network's own borders) and cropped off every map after the run.
"""

from __future__ import annotations

import math

import numpy as np

from inserve.server.imaging import network_size

Shape = tuple[int, int]  # (height, width) in network pixels


def parse_ratio(text: str) -> tuple[int, int]:
    """'4:3' -> (4, 3): width to height."""
    parts = text.split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"a bucket is WIDTH:HEIGHT with positive integers, e.g. 4:3, got {text!r}")
    return int(parts[0]), int(parts[1])


def bucket_shapes(ratios: tuple[str, ...] | list[str], long_side: int, multiple: int) -> list[Shape]:
    """The buckets' (height, width) at `long_side` on the `multiple` grid, smallest area first."""
    shapes = set()
    for ratio in ratios:
        width, height = network_size(*parse_ratio(ratio), long_side, multiple)
        shapes.add((height, width))
    return sorted(shapes, key=lambda s: (s[0] * s[1], s))


def choose_bucket(height: int, width: int, shapes: list[Shape]) -> Shape:
    """The smallest bucket holding a height x width input; the input's own shape when none does."""
    for bucket in shapes:
        if height <= bucket[0] and width <= bucket[1]:
            return bucket
    return (height, width)


def pad_batch(images: list[np.ndarray], shape: Shape, fill: np.ndarray) -> np.ndarray:
    """(3, h_i, w_i) images -> (B, 3, H, W), each in the top-left corner, the rest `fill` (per channel)."""
    batch = np.empty((len(images), 3, *shape), dtype=np.float32)
    batch[:] = np.asarray(fill, dtype=np.float32).reshape(1, 3, 1, 1)
    for i, image in enumerate(images):
        batch[i, :, : image.shape[1], : image.shape[2]] = image
    return batch


def valid_cells(size: Shape, stride: int) -> Shape:
    """Cells of a stride-`stride` map that see the image's own pixels (not only padding)."""
    return math.ceil(size[0] / stride), math.ceil(size[1] / stride)


def crop_map(batch_map: np.ndarray, size: Shape, input_height: int) -> np.ndarray:
    """One image's (C, h, w) map out of a padded batch map (C, H/s, W/s), s = input_height / H/s."""
    stride = input_height // batch_map.shape[-2]
    rows, cols = valid_cells(size, stride)
    return batch_map[..., :rows, :cols]
