"""Keyframe selection (histograms, shot cuts, intervals) and decoding of videos made here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from media import FRAME_SIZE, jpeg, object_video, scenes_video, write_video
from skimage import data

from inserve.server.config import ImageConfig
from inserve.server.video.decode import VideoError, decode_video
from inserve.server.video.keyframes import KeyframeSelector, SelectionRules, chi_square, colour_histogram

LIMITS = ImageConfig(max_pixels=10**6)

RULES = SelectionRules(scene_threshold=0.3, min_interval_s=0.5, max_interval_s=2.0, iframes_only=False)


def test_histogram_counts_pixels_in_rgb_cells() -> None:
    frame = np.zeros((2, 2, 3), dtype=np.uint8)
    frame[0, 0] = (255, 0, 0)  # red: cell (7, 0, 0)
    frame[0, 1] = (31, 32, 255)  # cell (0, 1, 7)
    hist = colour_histogram(frame)
    assert hist.shape == (512,) and hist.sum() == pytest.approx(1.0)
    assert hist[0] == 0.5  # two black pixels
    assert hist[7 * 64] == 0.25
    assert hist[0 * 64 + 1 * 8 + 7] == 0.25


def test_chi_square_is_zero_for_equal_and_one_for_disjoint_histograms() -> None:
    a = np.array([0.5, 0.5, 0.0, 0.0])
    b = np.array([0.0, 0.0, 0.25, 0.75])
    assert chi_square(a, a) == 0.0
    assert chi_square(a, b) == pytest.approx(1.0)
    # half the mass moved to bin 2: 0.5 * (2 * 0.25^2 / 0.75 + 0.5^2 / 0.5) = 1/3 by hand
    c = np.array([0.25, 0.25, 0.5, 0.0])
    assert chi_square(a, c) == pytest.approx(1 / 3)


def feed(selector: KeyframeSelector, frames: list[tuple[float, int]], intra: set[float] | None = None) -> list:
    """frames: (time, scene); scenes are disjoint one-hot histograms. Returns (time, shot) of keyframes."""
    picked = []
    for time_s, scene in frames:
        hist = np.zeros(8)
        hist[scene] = 1.0
        if selector.offer(time_s, hist, intra is None or time_s in intra):
            picked.append((time_s, selector.shot))
    return picked


def test_a_keyframe_per_shot_and_one_every_max_interval() -> None:
    frames = [(t / 4, 0) for t in range(0, 12)] + [(t / 4, 1) for t in range(12, 16)]  # cut at 3.0 s
    assert feed(KeyframeSelector(RULES), frames) == [(0.0, 0), (2.0, 0), (3.0, 1)]


def test_cuts_closer_than_min_interval_wait_for_it() -> None:
    frames = [(0.0, 0), (0.25, 1), (0.5, 1), (0.75, 2), (1.0, 2), (1.25, 2)]
    # cuts at 0.25 (too soon: its keyframe comes at 0.5) and at 0.75 (too soon after 0.5: at 1.0)
    assert feed(KeyframeSelector(RULES), frames) == [(0.0, 0), (0.5, 1), (1.0, 2)]


def test_iframes_only_takes_keyframes_among_intra_frames() -> None:
    rules = SelectionRules(0.3, 0.0, 2.0, iframes_only=True)
    frames = [(t / 4, 0 if t < 6 else 1) for t in range(12)]  # cut at 1.5 s, intra frames every second
    assert feed(KeyframeSelector(rules), frames, intra={0.0, 1.0, 2.0}) == [(0.0, 0), (2.0, 1)]


def test_rules_are_checked() -> None:
    with pytest.raises(ValueError):
        SelectionRules(0.3, 3.0, 2.0, False)
    with pytest.raises(ValueError):
        SelectionRules(0.0, 0.5, 2.0, False)


def test_decoding_gives_timed_frames(tmp_path: Path) -> None:
    path = object_video(tmp_path / "v.mp4", seconds=2, object_seconds={1}, fps=8)
    with path.open("rb") as f:
        frames = list(decode_video(f, iframes_only=False, limits=LIMITS))
    assert [fr.number for fr in frames] == list(range(16))
    assert [fr.time_s for fr in frames] == pytest.approx([i / 8 for i in range(16)])
    assert (frames[0].width, frames[0].height) == FRAME_SIZE
    assert frames[0].intra and frames[12].intra and not frames[1].intra  # GOP of 12
    with path.open("rb") as f:
        intra = list(decode_video(f, iframes_only=True, limits=LIMITS))
    assert [fr.number for fr in intra] == [0, 12]


def test_hard_cuts_between_photos_are_shots(tmp_path: Path) -> None:
    path = scenes_video(tmp_path / "s.mp4", [data.astronaut(), data.coffee(), data.chelsea()], seconds_each=1)
    selector, picked = KeyframeSelector(SelectionRules(0.3, 0.5, 5.0, False)), []
    with path.open("rb") as f:
        for frame in decode_video(f, False, LIMITS):
            if selector.offer(frame.time_s, colour_histogram(frame.small_rgb(64)), frame.intra):
                picked.append((frame.number, selector.shot))
    assert picked == [(0, 0), (8, 1), (16, 2)]


@pytest.mark.parametrize(
    "content",
    [b"", b"\x00" * 1000, b"not a video at all" * 100, jpeg(data.astronaut())],
    ids=["empty", "zeros", "text", "still-image"],
)
def test_what_is_not_a_video_is_a_video_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.mp4"
    path.write_bytes(content)
    with path.open("rb") as f, pytest.raises(VideoError):
        list(decode_video(f, False, LIMITS))


def test_truncated_and_oversized_videos_are_video_errors(tmp_path: Path) -> None:
    good = object_video(tmp_path / "v.mp4", seconds=2, object_seconds=set())
    truncated = tmp_path / "t.mp4"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with truncated.open("rb") as f, pytest.raises(VideoError, match="cannot open"):
        list(decode_video(f, False, LIMITS))
    with good.open("rb") as f, pytest.raises(VideoError, match="pixels, limit 1000"):
        list(decode_video(f, False, ImageConfig(max_pixels=1000)))


@pytest.mark.parametrize(
    ("size", "message"),
    [((640, 32), "extreme aspect ratio 640x32"), ((16, 12), "image too small: 16x12")],
    ids=["aspect", "tiny"],
)
def test_frames_beyond_the_image_limits_are_refused_before_decoding(
    tmp_path: Path, size: tuple[int, int], message: str, monkeypatch
) -> None:
    path = write_video(tmp_path / "odd.mp4", [np.full((size[1], size[0], 3), 90, np.uint8)] * 4, fps=4)
    decoded = []
    monkeypatch.setattr("av.container.InputContainer.decode", lambda *a, **k: decoded.append(1) or iter(()))
    with path.open("rb") as f, pytest.raises(VideoError, match=message):
        list(decode_video(f, False, LIMITS))
    assert decoded == []  # refused from the stream's declared size
