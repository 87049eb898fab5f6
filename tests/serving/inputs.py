"""Inputs for the bad-input sweep: broken, hostile and unusual image bytes, each with what the server should
say about it."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable

import numpy as np
from photos import encode, photo
from PIL import Image

SUPPORTED = r"not an image in a supported format \(JPEG, PNG, WEBP, BMP, TIFF, GIF\)"


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_declaring(width: int, height: int, text_bomb: bool = False) -> bytes:
    """A 32x32 PNG whose header declares width x height; with `text_bomb`, a zTXt chunk that inflates to
    64 MiB comes first."""
    rows = b"".join(b"\x00" + b"\x80" * 96 for _ in range(32))
    chunks = [_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))]
    if text_bomb:
        chunks.append(_chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(b"A" * (64 << 20), 9)))
    chunks += [_chunk(b"IDAT", zlib.compress(rows)), _chunk(b"IEND", b"")]
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunks)


def jpeg_declaring(width: int, height: int) -> bytes:
    """A real JPEG whose start-of-frame is rewritten to declare width x height."""
    data = bytearray(encode(photo("chelsea")))
    at = data.find(b"\xff\xc0")
    data[at + 5 : at + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def gif_declaring(width: int, height: int) -> bytes:
    data = bytearray(encode(photo("coffee"), format="GIF"))
    data[6:10] = struct.pack("<HH", width, height)
    return bytes(data)


def flat(width: int, height: int, format: str = "PNG") -> bytes:
    return encode(np.full((height, width, 3), 128, dtype=np.uint8), format=format)


def png_with_bad_crc() -> bytes:
    data = bytearray(encode(photo("chelsea"), format="PNG"))
    at = data.find(b"IDAT")
    data[at + 10] ^= 0xFF
    return bytes(data)


def _chelsea(format: str = "JPEG") -> bytes:
    return encode(photo("chelsea"), format=format)


# (name, bytes, what the refusal must say): each is refused with INVALID_ARGUMENT. Bytes are made when asked
# for (lambdas), so collecting the tests costs nothing.
BAD_IMAGES: list[tuple[str, Callable[[], bytes], str]] = [
    ("empty", lambda: b"", "empty image: no bytes"),
    (
        "truncated-jpeg",
        lambda: _chelsea()[:3000],
        r"cannot decode image \(3000 bytes\): damaged JPEG data: image file is truncated",
    ),
    ("jpeg-header-only", lambda: _chelsea()[:300], r"cannot decode image \(300 bytes\)"),
    (
        "truncated-png",
        lambda: _chelsea("PNG")[:5000],
        r"cannot decode image \(5000 bytes\): damaged PNG data: image file is truncated",
    ),
    ("png-signature-only", lambda: _chelsea("PNG")[:60], r"cannot decode image \(60 bytes\)"),
    ("png-bad-checksum", png_with_bad_crc, "damaged PNG data: broken data stream"),
    ("truncated-webp", lambda: _chelsea("WEBP")[:2000], r"cannot decode image \(2000 bytes\)"),
    ("truncated-tiff", lambda: _chelsea("TIFF")[:5000], "damaged TIFF data: image file is truncated"),
    ("truncated-gif", lambda: _chelsea("GIF")[:3000], "damaged GIF data: image file is truncated"),
    ("random-bytes", lambda: np.random.default_rng(0).bytes(4096), SUPPORTED),
    ("text", lambda: b"hello, this is not an image", SUPPORTED),
    ("svg", lambda: b'<svg xmlns="http://www.w3.org/2000/svg" width="100" height="100"/>', SUPPORTED),
    ("eps", lambda: b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100 100\nshowpage\n", SUPPORTED),
    ("ppm-format-not-served", lambda: _chelsea("PPM"), SUPPORTED),
    ("ico-format-not-served", lambda: encode(Image.fromarray(photo("chelsea")).resize((64, 64)), "ICO"), SUPPORTED),
    ("bomb-png-100000x100000", lambda: png_declaring(100_000, 100_000), "image too large: 100000x100000 = 10000000000"),
    ("bomb-jpeg-65000x65000", lambda: jpeg_declaring(65_000, 65_000), "image too large: 65000x65000"),
    ("bomb-gif-65535x65535", lambda: gif_declaring(65_535, 65_535), "image too large: 65535x65535"),
    ("bomb-png-text-chunk", lambda: png_declaring(32, 32, text_bomb=True), "Decompressed data too large"),
    (
        "over-the-pixel-limit",
        lambda: flat(1200, 900, "JPEG"),
        r"image too large: 1200x900 = 1080000 pixels, limit 1000000",
    ),
    ("1x1", lambda: flat(1, 1), "image too small: 1x1, each side must be at least 16 pixels"),
    ("15x15", lambda: flat(15, 15), "image too small: 15x15"),
    ("aspect-400x16", lambda: flat(400, 16), r"extreme aspect ratio 400x16 \(25.0:1\), at most 12:1"),
    ("aspect-16x400", lambda: flat(16, 400), r"extreme aspect ratio 16x400 \(25.0:1\)"),
]


def _exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(Image.fromarray(photo("chelsea")), exif=exif)


def _animated_gif() -> bytes:
    frames = [Image.fromarray(photo("coffee")), Image.fromarray(photo("chelsea")).resize((400, 300))]
    out = io.BytesIO()
    frames[0].save(out, format="GIF", save_all=True, append_images=frames[1:])
    return out.getvalue()


def _rgba() -> Image.Image:
    """chelsea, opaque on the left 200 columns and fully transparent on the right."""
    chelsea = photo("chelsea")
    alpha = np.where(np.arange(chelsea.shape[1]) < 200, 255, 0).astype(np.uint8)
    return Image.fromarray(np.dstack([chelsea, np.broadcast_to(alpha, chelsea.shape[:2])]), "RGBA")


# Unusual but sensible images: each is converted to RGB and served.
ACCEPTED_IMAGES: list[tuple[str, Callable[[], bytes]]] = [
    ("cmyk-jpeg", lambda: encode(Image.fromarray(photo("chelsea")).convert("CMYK"))),
    ("16-bit-grey-png", lambda: encode(Image.fromarray(photo("chelsea")[:, :, 0].astype(np.uint16) * 257), "PNG")),
    ("greyscale-jpeg", lambda: encode(Image.fromarray(photo("chelsea")).convert("L"))),
    ("rgba-png", lambda: encode(_rgba(), "PNG")),
    ("grey-alpha-png", lambda: encode(_rgba().convert("LA"), "PNG")),
    ("palette-transparency-png", lambda: encode(Image.fromarray(photo("chelsea")).convert("P"), "PNG", transparency=0)),
    ("bilevel-png", lambda: encode(Image.fromarray(photo("chelsea")).convert("1"), "PNG")),
    ("float-tiff", lambda: encode(Image.fromarray(photo("chelsea")[:, :, 1].astype(np.float32) / 7.0), "TIFF")),
    ("exif-rotated-jpeg", _exif_rotated),
    ("animated-gif-first-frame", _animated_gif),
    ("webp", lambda: _chelsea("WEBP")),
    ("bmp", lambda: _chelsea("BMP")),
    ("16x16", lambda: flat(16, 16)),
    ("aspect-12-to-1", lambda: flat(384, 32)),
]
