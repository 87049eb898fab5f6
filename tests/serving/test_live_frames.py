"""Live stream frames as the core takes them: raw pixel formats, and the names shared with the proto."""

from __future__ import annotations

import numpy as np
import pytest
from skimage import data

from inserve.server.config import OVERLOADS, ImageConfig
from inserve.server.imaging import ImageError
from inserve.server.video.live import PIXEL_FORMATS, raw_image
from inserve.v1 import inserve_pb2 as pb


def test_raw_pixels_in_every_format_give_the_same_rgb_image() -> None:
    rgb = data.astronaut()[::4, ::4].copy()
    grey = rgb[:, :, 1]
    height, width = grey.shape
    limits = ImageConfig()
    assert np.array_equal(np.asarray(raw_image(width, height, "rgb24", rgb.tobytes(), limits)), rgb)
    assert np.array_equal(np.asarray(raw_image(width, height, "bgr24", rgb[:, :, ::-1].tobytes(), limits)), rgb)
    assert np.array_equal(np.asarray(raw_image(width, height, "gray8", grey.tobytes(), limits)), np.dstack([grey] * 3))


@pytest.mark.parametrize(
    ("width", "height", "size", "message"),
    [
        (32, 24, 32 * 24 * 3 - 1, "take 2304 bytes, got 2303"),
        (8, 8, 8 * 8 * 3, "image too small"),
        (20000, 20000, 3, "image too large"),  # refused before the size of the data is looked at
    ],
)
def test_raw_pixels_that_do_not_fit_their_size_or_the_limits_are_refused(
    width: int, height: int, size: int, message: str
) -> None:
    with pytest.raises(ImageError, match=message):
        raw_image(width, height, "rgb24", bytes(size), ImageConfig())


def test_the_core_and_the_proto_name_the_same_overloads_and_pixel_formats() -> None:
    assert tuple(v.name.removeprefix("OVERLOAD_").lower() for v in pb.Overload.DESCRIPTOR.values) == OVERLOADS
    proto_formats = [v.name.removeprefix("PIXEL_FORMAT_").lower() for v in pb.PixelFormat.DESCRIPTOR.values]
    assert proto_formats == ["unspecified", *PIXEL_FORMATS]
