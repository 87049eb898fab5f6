"""Decoding untrusted bytes and fitting images to the network grid (server/imaging.py)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from photos import encode, photo
from PIL import Image

from inserve.server.config import ImageConfig
from inserve.server.imaging import ImageError, NetworkInput, decode_image, network_size, prepare, validate_box

CONFIG = ImageConfig()


def two_colour(width: int = 64, height: int = 48) -> np.ndarray:
    """Left half red, right half blue."""
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[:, : width // 2] = (220, 30, 30)
    image[:, width // 2 :] = (30, 30, 220)
    return image


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height (8-bit RGB) and holds no pixel data at all."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty image: no bytes"),
        (b"\x00\x01garbage" * 50, r"cannot decode image \(450 bytes\)"),
        (np.random.default_rng(0).bytes(4096), r"cannot decode image \(4096 bytes\)"),
        (encode(photo("chelsea"))[:3000], r"cannot decode image \(3000 bytes\)"),  # truncated JPEG
        (encode(photo("chelsea"), format="PNG")[:5000], r"cannot decode image \(5000 bytes\)"),  # truncated PNG
    ],
    ids=["empty", "garbage", "random", "truncated-jpeg", "truncated-png"],
)
def test_undecodable_bytes_are_refused_with_the_reason(data: bytes, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        decode_image(data, CONFIG)


def test_pixel_limit_is_checked_before_decoding() -> None:
    # the header promises 10^10 pixels and there are no pixels: decoding would fail differently (or OOM)
    with pytest.raises(ImageError, match=r"image too large: 100000x100000 = 10000000000 pixels, limit 40000000"):
        decode_image(png_header(100_000, 100_000), CONFIG)
    with pytest.raises(ImageError, match="image too large: 64x48 = 3072 pixels, limit 3000"):
        decode_image(encode(two_colour()), ImageConfig(max_pixels=3000))
    assert decode_image(encode(two_colour()), ImageConfig(max_pixels=3072)).size == (64, 48)


@pytest.mark.parametrize(
    ("size", "message"),
    [
        ((15, 100), "image too small: 15x100, each side must be at least 16 pixels"),
        ((400, 20), r"extreme aspect ratio 400x20 \(20.0:1\), at most 12:1"),
        ((20, 400), r"extreme aspect ratio 20x400 \(20.0:1\), at most 12:1"),
    ],
)
def test_geometry_is_checked(size: tuple[int, int], message: str) -> None:
    data = encode(np.full((size[1], size[0], 3), 128, dtype=np.uint8), format="PNG")
    with pytest.raises(ImageError, match=message):
        decode_image(data, CONFIG)


def test_geometry_is_checked_before_decoding() -> None:
    # 65535 x 600 is under the pixel limit; the header holds no pixels, so only a check before decoding says why
    with pytest.raises(ImageError, match=r"extreme aspect ratio 65535x600"):
        decode_image(png_header(65535, 600), CONFIG)


def short_png(width: int, height: int, rows: int) -> bytes:
    """A well-formed PNG declaring width x height whose zlib stream ends, cleanly, after `rows` rows."""
    idat = zlib.compress(b"".join(b"\x00" + bytes([128]) * (3 * width) for _ in range(rows)))
    header = png_header(width, height)
    iend = header[-12:]
    return (
        header[:-12]
        + struct.pack(">I", len(idat))
        + b"IDAT"
        + idat
        + struct.pack(">I", zlib.crc32(b"IDAT" + idat))
        + iend
    )


def test_a_png_too_short_for_its_declared_size_is_truncated() -> None:
    with pytest.raises(ImageError, match="truncated PNG: it declares 6000x6000 pixels but holds only"):
        decode_image(short_png(6000, 6000, rows=2), CONFIG)
    flat = encode(np.zeros((3000, 3000, 3), dtype=np.uint8), format="PNG")  # as compressible as a PNG gets
    assert decode_image(flat, CONFIG).size == (3000, 3000)


def test_boundary_geometry_is_accepted() -> None:
    assert decode_image(encode(np.zeros((16, 192, 3), dtype=np.uint8), format="PNG"), CONFIG).size == (192, 16)


def test_rgb_jpeg_decodes_to_rgb() -> None:
    image = decode_image(encode(two_colour()), CONFIG)
    assert image.mode == "RGB" and image.size == (64, 48)
    pixels = np.asarray(image, dtype=np.int32)
    np.testing.assert_allclose(pixels[24, 10], (220, 30, 30), atol=12)
    np.testing.assert_allclose(pixels[24, 54], (30, 30, 220), atol=12)


def test_cmyk_jpeg_decodes_to_the_same_colours() -> None:
    data = encode(Image.fromarray(two_colour()).convert("CMYK"))
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    pixels = np.asarray(decode_image(data, CONFIG), dtype=np.int32)
    np.testing.assert_allclose(pixels[24, 10], (220, 30, 30), atol=12)
    np.testing.assert_allclose(pixels[24, 54], (30, 30, 220), atol=12)


def test_greyscale_decodes_to_three_equal_channels() -> None:
    grey = photo("camera")[:, :, 0]
    pixels = np.asarray(decode_image(encode(grey, format="PNG"), CONFIG))
    assert pixels.shape == (512, 512, 3)
    np.testing.assert_array_equal(pixels[:, :, 0], grey)
    np.testing.assert_array_equal(pixels[:, :, 1], grey)


def test_16_bit_png_is_scaled_to_8_bits() -> None:
    ramp = np.tile(np.linspace(0, 60000, 64).astype(np.uint16), (32, 1))
    data = encode(Image.fromarray(ramp), format="PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    pixels = np.asarray(decode_image(data, CONFIG), dtype=np.int32)
    assert pixels.shape == (32, 64, 3)
    assert pixels[0, 0, 0] == 0 and pixels[0, -1, 0] == 255  # the brightest value maps to white
    np.testing.assert_allclose(pixels[0, :, 0], ramp[0] / 60000 * 255, atol=1)


def test_rgba_transparent_pixels_become_white() -> None:
    rgba = np.zeros((32, 32, 4), dtype=np.uint8)
    rgba[:, :16] = (200, 20, 20, 255)  # opaque red
    rgba[:, 16:] = (0, 0, 0, 0)  # fully transparent (black underneath)
    pixels = np.asarray(decode_image(encode(Image.fromarray(rgba, "RGBA"), format="PNG"), CONFIG))
    np.testing.assert_array_equal(pixels[5, 5], (200, 20, 20))
    np.testing.assert_array_equal(pixels[5, 25], (255, 255, 255))


def test_palette_transparency_becomes_white() -> None:
    indices = np.zeros((32, 32), dtype=np.uint8)
    indices[:, 16:] = 1
    image = Image.fromarray(indices, "P")
    image.putpalette([10, 200, 10, 0, 0, 0] + [0] * (256 * 3 - 6))
    data = encode(image, format="PNG", transparency=1)
    assert Image.open(io.BytesIO(data)).mode == "P"
    pixels = np.asarray(decode_image(data, CONFIG))
    np.testing.assert_array_equal(pixels[5, 5], (10, 200, 10))
    np.testing.assert_array_equal(pixels[5, 25], (255, 255, 255))


def test_exif_orientation_is_applied() -> None:
    stored = two_colour(64, 32)  # red left, blue right, as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    data = encode(Image.fromarray(stored), exif=exif)
    image = decode_image(data, CONFIG)
    assert image.size == (32, 64)  # width and height swap
    pixels = np.asarray(image, dtype=np.int32)
    # turned clockwise, the stored left (red) half is on top and the right (blue) half below
    np.testing.assert_allclose(pixels[10, 16], (220, 30, 30), atol=12)
    np.testing.assert_allclose(pixels[54, 16], (30, 30, 220), atol=12)


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((640, 480), (512, 384)),  # exact
        ((451, 300), (512, 352)),  # 340.6 -> 352 (nearest multiple of 32)
        ((300, 451), (352, 512)),
        ((512, 512), (512, 512)),
        ((100, 60), (512, 320)),  # small images are enlarged: 307.2 -> 320
        ((4000, 200), (512, 32)),  # 25.6 -> never below one multiple
        ((1000, 10), (512, 32)),  # 5.12 rounds to 0: still one multiple
    ],
)
def test_network_size_rounds_to_the_nearest_multiple(size: tuple[int, int], expected: tuple[int, int]) -> None:
    assert network_size(*size, long_side=512, multiple=32) == expected


def test_network_size_other_long_side() -> None:
    assert network_size(451, 300, long_side=224, multiple=32) == (224, 160)  # 149 -> 160


def test_prepare_resizes_and_keeps_the_original_size() -> None:
    inp = prepare(Image.fromarray(photo("chelsea")), 512, 32, thumbnail_side=64)
    assert inp.pixels.shape == (3, 352, 512) and inp.pixels.dtype == np.float32
    assert (inp.width, inp.height) == (451, 300)
    assert inp.pixels.min() >= 0 and inp.pixels.max() <= 255
    thumbnail = Image.open(io.BytesIO(inp.thumbnail))
    assert thumbnail.format == "JPEG" and max(thumbnail.size) == 64
    assert prepare(Image.fromarray(photo("chelsea")), 512, 32).thumbnail == b""


def test_boxes_round_trip_between_original_and_network_pixels() -> None:
    inp = NetworkInput(np.zeros((3, 352, 512), dtype=np.float32), width=451, height=300)
    boxes = np.array([[10, 20, 200, 150], [0, 0, 451, 300], [100.5, 7.25, 101.5, 8.25]], dtype=np.float32)
    net = inp.to_network(boxes)
    np.testing.assert_allclose(net[1], [0, 0, 512, 352], rtol=1e-6)
    np.testing.assert_allclose(net[0], [10 * 512 / 451, 20 * 352 / 300, 200 * 512 / 451, 150 * 352 / 300], rtol=1e-6)
    np.testing.assert_allclose(inp.to_original(net), boxes, rtol=1e-5, atol=1e-4)


def test_to_original_clips_to_the_image() -> None:
    inp = NetworkInput(np.zeros((3, 64, 128), dtype=np.float32), width=256, height=128)
    out = inp.to_original(np.array([[-10, -5, 200, 70]], dtype=np.float32))
    np.testing.assert_allclose(out, [[0, 0, 256, 128]])


@pytest.mark.parametrize(
    ("box", "expected"),
    [
        ((10, 20, 30, 40), (10, 20, 30, 40)),
        ((-5, -5, 30, 40), (0, 0, 30, 40)),  # clipped
        ((50, 60, 500, 500), (50, 60, 100, 80)),  # clipped to the 100 x 80 image
        ((0, 0, 100, 80), (0, 0, 100, 80)),
    ],
)
def test_validate_box_clips(box: tuple[float, ...], expected: tuple[float, ...]) -> None:
    assert validate_box(box, 100, 80) == expected


@pytest.mark.parametrize(
    ("box", "message"),
    [
        ((30, 20, 10, 40), "box must have x1 < x2 and y1 < y2"),
        ((10, 40, 30, 40), "box must have x1 < x2 and y1 < y2"),
        ((10, 20, float("nan"), 40), "non-finite coordinate"),
        ((10, 20, float("inf"), 40), "non-finite coordinate"),
        ((120, 10, 150, 30), "lies outside the 100x80 image"),
        ((99.5, 10, 150, 30), "lies outside the 100x80 image"),  # half a pixel left after clipping
        ((-20, -20, -1, -1), "lies outside the 100x80 image"),
    ],
)
def test_validate_box_refuses(box: tuple[float, ...], message: str) -> None:
    with pytest.raises(ImageError, match=message):
        validate_box(box, 100, 80)
