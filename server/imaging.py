"""Decoding untrusted image bytes and fitting images to the network's input grid."""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from inserve.server.config import ImageConfig
from inserve.server.errors import ImageError

Image.MAX_IMAGE_PIXELS = None  # the pixel limit is ours (ImageConfig.max_pixels), checked before decoding


def decode_image(data: bytes, config: ImageConfig) -> Image.Image:
    """RGB image from encoded bytes: any mode (CMYK, 16-bit, grey, palette, alpha), EXIF orientation applied.

    Only the configured formats' decoders see the bytes; the declared size is checked against the pixel
    limit before any pixel is decoded. Anything that goes wrong is an ImageError saying what.
    """
    if not data:
        raise ImageError("empty image: no bytes")
    image = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow warns of damaged metadata it skips; the pixels are checked
            image = Image.open(io.BytesIO(data), formats=config.formats)
            check_size(*image.size, config)
            _check_png_holds_its_pixels(image, len(data))
            image.load()
            image = ImageOps.exif_transpose(image)
    except ImageError:
        raise
    except UnidentifiedImageError as exc:
        kinds = ", ".join(config.formats)
        raise ImageError(
            f"cannot decode image ({len(data)} bytes): not an image in a supported format ({kinds})"
        ) from exc
    except Exception as exc:  # PIL raises many types for corrupt data
        damaged = f"damaged {image.format} data: " if image is not None and image.format else ""
        raise ImageError(f"cannot decode image ({len(data)} bytes): {damaged}{exc}") from exc
    try:
        return _to_rgb(image)
    except Exception as exc:
        raise ImageError(f"cannot convert a {image.mode} image to RGB: {exc}") from exc


def check_size(width: int, height: int, config: ImageConfig) -> None:
    """A declared image or video frame size against the pixel, side and aspect limits, before any pixel is
    decoded (a few hundred bytes can declare 65535 x 600 pixels). EXIF rotation does not change the verdict."""
    if width * height > config.max_pixels:
        raise ImageError(f"image too large: {width}x{height} = {width * height} pixels, limit {config.max_pixels}")
    if min(width, height) < config.min_side:
        raise ImageError(f"image too small: {width}x{height}, each side must be at least {config.min_side} pixels")
    aspect = max(width, height) / min(width, height)
    if aspect > config.max_aspect:
        raise ImageError(f"extreme aspect ratio {width}x{height} ({aspect:.1f}:1), at most {config.max_aspect:g}:1")


# deflate never compresses more than 1032:1, so a PNG's data cannot be shorter than this share of its rows
_DEFLATE_MAX_RATIO = 1032


def _check_png_holds_its_pixels(image: Image.Image, size_bytes: int) -> None:
    """Refuse a PNG too short for the size it declares: Pillow decodes a zlib stream that ends early as if the
    missing rows were black (6000 x 6000 from 121 bytes). Its rows hold at least a filter byte and one bit per
    pixel, and no deflate stream is shorter than 1/1032 of what it inflates to."""
    if image.format != "PNG":
        return
    width, height = image.size
    least_raw = height * (1 + (width + 7) // 8)
    if size_bytes * _DEFLATE_MAX_RATIO < least_raw:
        raise ImageError(
            f"truncated PNG: it declares {width}x{height} pixels but holds only {size_bytes} bytes"
            f" (at least {least_raw // _DEFLATE_MAX_RATIO} needed)"
        )


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        top = array.max() if array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / top * 255.0, 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        finite = np.isfinite(array)
        low, high = (array[finite].min(), array[finite].max()) if finite.any() else (0.0, 0.0)
        array = np.where(finite, array, low)
        span = max(high - low, 1e-12)
        image = Image.fromarray(((array - low) / span * 255.0).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


@dataclass(frozen=True)
class NetworkInput:
    """An image resized for the network: pixels (3,H,W) float32 0..255 and the scale back to the original."""

    pixels: np.ndarray
    width: int  # original size
    height: int
    thumbnail: bytes = b""  # JPEG kept with the index entry, for result pictures

    @property
    def scale_x(self) -> float:
        return self.pixels.shape[2] / self.width

    @property
    def scale_y(self) -> float:
        return self.pixels.shape[1] / self.height

    def to_original(self, boxes: np.ndarray) -> np.ndarray:
        """Boxes (N,4) in network pixels -> original pixels, clipped to the image."""
        scale = np.array([self.scale_x, self.scale_y, self.scale_x, self.scale_y], dtype=np.float32)
        out = boxes / scale
        return np.clip(out, 0, [self.width, self.height, self.width, self.height]).astype(np.float32)

    def to_network(self, boxes: np.ndarray) -> np.ndarray:
        scale = np.array([self.scale_x, self.scale_y, self.scale_x, self.scale_y], dtype=np.float32)
        return (np.asarray(boxes, dtype=np.float32) * scale).astype(np.float32)


def network_size(width: int, height: int, long_side: int, multiple: int) -> tuple[int, int]:
    """Long side to `long_side`, both sides rounded to the nearest multiple of `multiple` (the network's
    total stride, so every layer sees whole cells); the aspect ratio moves by at most multiple/2 pixels."""
    scale = long_side / max(width, height)
    return (
        max(multiple, multiple * round(width * scale / multiple)),
        max(multiple, multiple * round(height * scale / multiple)),
    )


def thumbnail_jpeg(image: Image.Image, side: int) -> bytes:
    if side <= 0:
        return b""
    small = image.copy()
    small.thumbnail((side, side), Image.BILINEAR)
    out = io.BytesIO()
    small.save(out, format="JPEG", quality=85)
    return out.getvalue()


def prepare(image: Image.Image, long_side: int, multiple: int, thumbnail_side: int = 0) -> NetworkInput:
    width, height = image.size
    size = network_size(width, height, long_side, multiple)
    resized = image.resize(size, Image.BICUBIC) if size != image.size else image
    pixels = np.asarray(resized, dtype=np.float32).transpose(2, 0, 1)
    return NetworkInput(np.ascontiguousarray(pixels), width, height, thumbnail_jpeg(image, thumbnail_side))


def validate_box(box: tuple[float, float, float, float], width: int, height: int) -> tuple[float, float, float, float]:
    """A query box in original pixels, clipped to the image; refuses boxes that cannot mean a region."""
    x1, y1, x2, y2 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise ImageError(f"box has a non-finite coordinate: {box}")
    if x2 <= x1 or y2 <= y1:
        raise ImageError(f"box must have x1 < x2 and y1 < y2, got ({x1}, {y1}, {x2}, {y2})")
    cx1, cy1, cx2, cy2 = max(x1, 0.0), max(y1, 0.0), min(x2, float(width)), min(y2, float(height))
    if cx2 - cx1 < 1 or cy2 - cy1 < 1:
        raise ImageError(f"box ({x1}, {y1}, {x2}, {y2}) lies outside the {width}x{height} image")
    return cx1, cy1, cx2, cy2
