"""Test photos: scikit-image's sample images, encoded as a client would send them, and composites."""

from __future__ import annotations

import io
from functools import cache

import numpy as np
from PIL import Image

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "motorcycle", "immunohistochemistry", "coins")


def photo(name: str) -> np.ndarray:
    """An skimage sample image as (H, W, 3) uint8 RGB; greyscale ones are replicated to three channels."""
    from skimage import data

    image = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    return np.ascontiguousarray(image[:, :, :3]).astype(np.uint8)


def encode(image: np.ndarray | Image.Image, format: str = "JPEG", **params: object) -> bytes:
    """Encoded bytes of an array or PIL image (JPEG quality 90 unless told otherwise)."""
    picture = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    if format == "JPEG":
        params.setdefault("quality", 90)
    out = io.BytesIO()
    picture.save(out, format=format, **params)
    return out.getvalue()


def photo_jpeg(name: str) -> bytes:
    return encode(photo(name))


@cache
def distinct_photo(i: int) -> bytes:
    """Image i of as many distinct ones as needed: a shifted three-quarter crop of one of the test photos,
    192 pixels wide, as JPEG."""
    picture = photo(PHOTOS[i % len(PHOTOS)])
    height, width = picture.shape[:2]
    step = i // len(PHOTOS)
    x, y = (step * 7) % (width // 4), (step * 5) % (height // 4)
    cut = picture[y : y + 3 * height // 4, x : x + 3 * width // 4]
    small = Image.fromarray(cut).resize((192, round(192 * cut.shape[0] / cut.shape[1])), Image.BILINEAR)
    return encode(np.asarray(small))


def crop(image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    x1, y1, x2, y2 = box
    return np.ascontiguousarray(image[y1:y2, x1:x2])


def planted(
    background: np.ndarray, instance: np.ndarray, scale: float, position: tuple[float, float]
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """`instance` resized by `scale` and pasted into `background` with its top-left corner at `position`
    (fractions of the background's width and height); returns the composite and the pasted box."""
    height, width = background.shape[:2]
    size = (max(1, round(instance.shape[1] * scale)), max(1, round(instance.shape[0] * scale)))
    small = np.asarray(Image.fromarray(instance).resize(size, Image.BICUBIC))
    x1, y1 = round(position[0] * width), round(position[1] * height)
    x2, y2 = min(width, x1 + size[0]), min(height, y1 + size[1])
    composite = background.copy()
    composite[y1:y2, x1:x2] = small[: y2 - y1, : x2 - x1]
    return composite, (x1, y1, x2, y2)


def box_iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    from inserve.server.stages.nms import box_iou as iou

    return float(iou(np.array(a), np.array(b))[0, 0])


def contains(outer: tuple[float, ...], inner: tuple[float, ...]) -> bool:
    return outer[0] <= inner[0] and outer[1] <= inner[1] and outer[2] >= inner[2] and outer[3] >= inner[3]
