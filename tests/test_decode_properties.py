"""Property tests of decoding untrusted image bytes and of query boxes: whatever the bytes or numbers, the
answer is an image (box) that satisfies the configured limits, or ImageError. Never another exception."""

from __future__ import annotations

import io
import math

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from inserve.server.config import ImageConfig
from inserve.server.imaging import ImageError, decode_image, validate_box

CONFIG = ImageConfig(max_pixels=250_000)
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")
MODES = ("RGB", "L", "LA", "RGBA", "P", "1", "CMYK", "I", "F", "I;16")
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def satisfies_the_limits(image: Image.Image, config: ImageConfig = CONFIG) -> None:
    width, height = image.size
    assert image.mode == "RGB"
    assert min(width, height) >= config.min_side
    assert max(width, height) / min(width, height) <= config.max_aspect
    assert width * height <= config.max_pixels
    assert np.asarray(image).shape == (height, width, 3)


def decodes_or_refuses(data: bytes) -> None:
    try:
        image = decode_image(data, CONFIG)
    except ImageError as exc:
        assert str(exc)  # says why
        return
    satisfies_the_limits(image)


@st.composite
def encoded_images(draw: st.DrawFn) -> bytes:
    """A small random image in some mode, encoded in some format (combinations a format cannot store are
    converted to RGB first)."""
    width, height = draw(st.integers(1, 80)), draw(st.integers(1, 80))
    seed = draw(st.integers(0, 2**32 - 1))
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 4), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGBA").convert(draw(st.sampled_from(MODES)))
    if image.mode == "I;16":
        image = Image.fromarray(pixels[:, :, 0].astype(np.uint16) * 257)
    format = draw(st.sampled_from(FORMATS))
    out = io.BytesIO()
    try:
        image.save(out, format=format)
    except (OSError, ValueError, KeyError):
        out = io.BytesIO()
        image.convert("RGB").save(out, format=format)
    return out.getvalue()


@st.composite
def damaged(draw: st.DrawFn, images: st.SearchStrategy[bytes]) -> bytes:
    """An encoded image cut short, with bytes overwritten, or with bytes inserted."""
    data = bytearray(draw(images))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(("truncate", "overwrite", "insert")))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "truncate":
            del data[at:]
        elif kind == "overwrite" and data:
            data[at] = draw(st.integers(0, 255))
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


@SETTINGS
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_decode_or_are_refused(data: bytes) -> None:
    decodes_or_refuses(data)


@SETTINGS
@given(encoded_images())
def test_every_mode_and_format_decodes_to_rgb_or_is_refused_for_its_geometry(data: bytes) -> None:
    try:
        image = decode_image(data, CONFIG)
    except ImageError as exc:
        assert "too small" in str(exc) or "aspect ratio" in str(exc), str(exc)  # well-formed: only geometry
        return
    satisfies_the_limits(image)


@SETTINGS
@given(damaged(encoded_images()))
def test_damaged_images_decode_or_are_refused(data: bytes) -> None:
    decodes_or_refuses(data)


@SETTINGS
@given(st.integers(1, 100_000), st.integers(1, 100_000), st.sampled_from(("PNG", "GIF", "BMP")))
def test_declared_sizes_over_the_limit_are_refused_before_decoding(width: int, height: int, format: str) -> None:
    """A small valid file whose header is rewritten to declare width x height."""
    out = io.BytesIO()
    Image.new("RGB", (16, 16)).save(out, format=format)
    data = bytearray(out.getvalue())
    if format == "PNG":
        data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    elif format == "GIF":
        data[6:10] = (width % 65536).to_bytes(2, "little") + (height % 65536).to_bytes(2, "little")
    else:
        data[18:26] = width.to_bytes(4, "little") + height.to_bytes(4, "little")
    try:
        image = decode_image(bytes(data), CONFIG)
    except ImageError:
        return
    satisfies_the_limits(image)


coordinates = st.floats(allow_nan=True, allow_infinity=True, width=32)


@settings(max_examples=500, deadline=None)
@given(st.tuples(coordinates, coordinates, coordinates, coordinates), st.integers(1, 10_000), st.integers(1, 10_000))
def test_query_boxes_are_a_region_of_the_image_or_refused(box: tuple[float, ...], width: int, height: int) -> None:
    try:
        x1, y1, x2, y2 = validate_box(box, width, height)
    except ImageError as exc:
        assert str(exc)
        return
    assert all(math.isfinite(v) for v in (x1, y1, x2, y2))
    assert x1 >= 0 and x2 <= width and y1 >= 0 and y2 <= height
    assert x2 - x1 >= 1 and y2 - y1 >= 1
