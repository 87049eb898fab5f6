"""Test media made on the spot: photos from scikit-image, a short video with an object in some seconds."""

from __future__ import annotations

import io
from pathlib import Path

import av
import numpy as np
from PIL import Image
from skimage import data

FRAME_SIZE = (320, 240)
OBJECT_SIZE = (150, 100)


def jpeg(array: np.ndarray, quality: int = 90) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).convert("RGB").save(out, format="JPEG", quality=quality)
    return out.getvalue()


def resized(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(array).convert("RGB").resize(size, Image.BICUBIC))


def the_object() -> np.ndarray:
    """The photographed object the video shows in some seconds: scikit-image's cat."""
    return data.chelsea()


def write_video(path: Path, frames: list[np.ndarray], fps: int) -> Path:
    """H.264 MP4 of RGB frames (even sizes), every 12th frame an I-frame."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames[0].shape[1], frames[0].shape[0]
        stream.pix_fmt = "yuv420p"
        stream.options = {"g": "12", "preset": "ultrafast"}
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def object_video(path: Path, seconds: int, object_seconds: set[int], fps: int = 8) -> Path:
    """A slow pan over scikit-image's rocket scene; in `object_seconds` the cat is pasted in, drifting."""
    scene = resized(data.rocket(), (FRAME_SIZE[0] + seconds * fps, FRAME_SIZE[1]))
    cat = resized(the_object(), OBJECT_SIZE)
    frames = []
    for i in range(seconds * fps):
        frame = scene[:, i : i + FRAME_SIZE[0]].copy()
        if i // fps in object_seconds:
            x, y = 40 + (i % fps) * 4, 70
            frame[y : y + OBJECT_SIZE[1], x : x + OBJECT_SIZE[0]] = cat
        frames.append(frame)
    return write_video(path, frames, fps)


def scenes_video(path: Path, scenes: list[np.ndarray], seconds_each: int = 2, fps: int = 8) -> Path:
    """Hard cuts between still photos (each resized to the frame size), `seconds_each` per scene."""
    frames = [resized(scene, FRAME_SIZE) for scene in scenes for _ in range(seconds_each * fps)]
    return write_video(path, frames, fps)
