"""Decoding untrusted video with PyAV into timed frames; anything it cannot decode is a VideoError."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import av
import numpy as np
from PIL import Image

from inserve.server.config import ImageConfig
from inserve.server.errors import VideoError
from inserve.server.imaging import ImageError, check_size

VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".ts", ".mpg", ".mpeg")  # of folders of videos


@dataclass(frozen=True)
class Frame:
    number: int  # frame number from the start of the video (time x frame rate when the rate is known)
    time_s: float  # presentation time from the start of the stream
    intra: bool  # a key (I) frame of the codec
    frame: av.VideoFrame

    @property
    def width(self) -> int:
        return self.frame.width

    @property
    def height(self) -> int:
        return self.frame.height

    def small_rgb(self, side: int) -> np.ndarray:
        """(h, w, 3) uint8 RGB, long side `side`: enough for colour histograms, cheap to make."""
        scale = side / max(self.width, self.height)
        width, height = max(1, round(self.width * scale)), max(1, round(self.height * scale))
        return self.frame.reformat(width=width, height=height, format="rgb24").to_ndarray()

    def image(self) -> Image.Image:
        return self.frame.to_image()


def check_frame_size(width: int, height: int, limits: ImageConfig) -> None:
    """A frame size against the image limits (pixels, sides, aspect), as a VideoError."""
    try:
        check_size(width, height, limits)
    except ImageError as exc:
        raise VideoError(f"frames of {width}x{height}: {exc}") from exc


def decode_video(file: BinaryIO, iframes_only: bool, limits: ImageConfig) -> Iterator[Frame]:
    """The first video stream's frames in presentation order (only its intra frames when `iframes_only`:
    the decoder then skips the others, which is much faster). The stream's declared frame size is checked
    against `limits` before any frame is decoded, and every frame's (the size may change mid-stream)."""
    try:
        container = av.open(file, mode="r")
    except (av.error.FFmpegError, ValueError, OSError) as exc:
        raise VideoError(f"cannot open video: {getattr(exc, 'strerror', None) or exc}") from exc
    with container:
        if container.format.name == "image2" or container.format.name.endswith("_pipe"):
            raise VideoError(f"a still image ({container.format.name}), not a video: index it with IndexImages")
        if not container.streams.video:
            raise VideoError("no video stream in the file")
        stream = container.streams.video[0]
        if stream.codec_context is None:
            raise VideoError(f"unsupported video codec {stream.codec_tag!r}")
        if stream.codec_context.width and stream.codec_context.height:
            check_frame_size(stream.codec_context.width, stream.codec_context.height, limits)
        stream.thread_type = "AUTO"
        if iframes_only:
            stream.codec_context.skip_frame = "NONKEY"
        rate = float(stream.average_rate) if stream.average_rate else None
        origin = float(stream.start_time * stream.time_base) if stream.start_time is not None else None
        count = 0
        try:
            for frame in container.decode(stream):
                check_frame_size(frame.width, frame.height, limits)
                time_s = frame.time if frame.time is not None else count / (rate or 1.0)
                if origin is None:
                    origin = time_s
                time_s = max(0.0, time_s - origin)
                number = round(time_s * rate) if rate else count
                count += 1
                yield Frame(number, time_s, bool(frame.key_frame), frame)
        except av.error.FFmpegError as exc:
            raise VideoError(f"corrupt video after {count} frames: {getattr(exc, 'strerror', None) or exc}") from exc
        if count == 0:
            raise VideoError("no decodable frames in the video")
