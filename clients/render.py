"""Pictures of results: the query with its box and the hits with the boxes where the instance was found."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

TILE = 256
LABEL = 34
QUERY_COLOUR = (40, 200, 80)
HIT_COLOUR = (235, 50, 40)


@dataclass(frozen=True)
class Tile:
    image: Image.Image | None  # None when neither a thumbnail nor the source file is at hand
    width: int  # size the box coordinates refer to (the original image)
    height: int
    box: tuple[float, float, float, float] | None
    caption: str
    colour: tuple[int, int, int]


def timecode(seconds: float) -> str:
    """HH:MM:SS.mmm"""
    millis = round(max(0.0, seconds) * 1000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}.{millis:03d}"


def open_image(data: bytes | None, source: str = "") -> Image.Image | None:
    """The hit's thumbnail, else its source file when this machine can read it."""
    if data:
        return Image.open(io.BytesIO(data)).convert("RGB")
    if source and Path(source).is_file():
        return Image.open(source).convert("RGB")
    return None


def _draw_tile(tile: Tile, font: ImageFont.ImageFont) -> Image.Image:
    canvas = Image.new("RGB", (TILE, TILE + LABEL), (245, 245, 245))
    draw = ImageDraw.Draw(canvas)
    if tile.image is not None:
        picture = tile.image.copy()
        picture.thumbnail((TILE, TILE), Image.BILINEAR)
        left, top = (TILE - picture.width) // 2, (TILE - picture.height) // 2
        canvas.paste(picture, (left, top))
        if tile.box is not None:
            sx, sy = picture.width / tile.width, picture.height / tile.height
            x1, y1, x2, y2 = tile.box
            draw.rectangle((left + x1 * sx, top + y1 * sy, left + x2 * sx, top + y2 * sy), outline=tile.colour, width=3)
    else:
        draw.text((8, TILE // 2), "(no picture)", fill=(120, 120, 120), font=font)
    for i, line in enumerate(tile.caption.splitlines()[:2]):
        draw.text((4, TILE + 2 + 15 * i), line[:40], fill=(20, 20, 20), font=font)
    return canvas


def render_results(tiles: list[Tile], columns: int = 5) -> Image.Image:
    """One image: the tiles in a grid, query first."""
    font = ImageFont.load_default()
    rows = (len(tiles) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * (TILE + 6) + 6, rows * (TILE + LABEL + 6) + 6), (255, 255, 255))
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        sheet.paste(_draw_tile(tile, font), (6 + c * (TILE + 6), 6 + r * (TILE + LABEL + 6)))
    return sheet
