"""Index one video: decode, select keyframes and describe them through the shared batcher.

A video indexed for the first time has its keyframes committed as they are described, so that they are
searchable while the rest is decoded, and a video that fails or is cancelled half-way keeps what was committed
(progress says how much). A video indexed again has its keyframes replaced in one transaction at the end: its
old keyframes stay searchable until then, and a failure leaves them as they were."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, replace
from typing import BinaryIO

from PIL import Image

from inserve.server.config import ServerConfig
from inserve.server.errors import VideoError
from inserve.server.ids import keyframe_id
from inserve.server.imaging import NetworkInput
from inserve.server.index import NewKeyframe
from inserve.server.instance_search import InstanceSearch
from inserve.server.recipes import ImageVectors
from inserve.server.video.decode import Frame, decode_video
from inserve.server.video.keyframes import KeyframeSelector, SelectionRules, colour_histogram


@dataclass(frozen=True)
class VideoProgress:
    video_id: str
    frames_decoded: int = 0
    keyframes_selected: int = 0
    keyframes_indexed: int = 0  # described so far
    keyframes_committed: int = 0  # durable and searchable so far (a re-indexed video's: all at once, when done)
    regions: int = 0
    shots: int = 0
    duration_s: float = 0.0  # of video decoded so far
    replaced: int = 0  # keyframes the video had before (set when done)
    done: bool = False


@dataclass(frozen=True)
class SelectedFrame:
    """A frame chosen as a keyframe (of a file or a live stream), resized for the network."""

    frame: int
    time_s: float
    shot: int
    inp: NetworkInput


def new_keyframe(video_id: str, selected: SelectedFrame, described: dict[str, ImageVectors]) -> NewKeyframe:
    """What the index stores of a described keyframe."""
    return NewKeyframe(
        keyframe_id(video_id, selected.frame),
        selected.frame,
        selected.time_s,
        selected.shot,
        selected.inp.width,
        selected.inp.height,
        [v for vectors in described.values() for v in vectors.vectors],
        selected.inp.thumbnail,
    )


def selected_frames(
    file: BinaryIO, rules: SelectionRules, config: ServerConfig, prepare: Callable[[Image.Image], NetworkInput]
) -> Iterator[tuple[Frame, SelectedFrame | None, int]]:
    """Every decoded frame of a video file; for a keyframe, also the frame made ready for the network by
    `prepare`; and how many shots so far. What IndexVideo and bulk indexing (server/bulk_index.py) select."""
    selector = KeyframeSelector(rules)
    for frame in decode_video(file, rules.iframes_only, config.image):
        histogram = colour_histogram(frame.small_rgb(config.video.histogram_side))
        chosen = selector.offer(frame.time_s, histogram, frame.intra)
        selected = SelectedFrame(frame.number, frame.time_s, selector.shot, prepare(frame.image())) if chosen else None
        yield frame, selected, selector.shot + 1


def region_count(described: dict[str, ImageVectors]) -> int:
    return sum(len(v.regions.boxes) for v in described.values())


def index_video(
    core: InstanceSearch,
    video_id: str,
    file: BinaryIO,
    rules: SelectionRules,
    *,
    source: str = "",
    metadata: dict[str, str] | None = None,
    progress: Callable[[VideoProgress], None] = lambda p: None,
    cancelled: threading.Event | None = None,
    deadline: float | None = None,
) -> VideoProgress:
    """Blocking. Raises VideoError, CancelledError when `cancelled` is set, and what the batcher raises
    (DeadlineExceeded) for `deadline` (time.monotonic() seconds); a new video keeps the keyframes committed until
    then (its last progress says how many), a re-indexed one stays as it was."""
    state = VideoProgress(video_id)
    batch: list[SelectedFrame] = []
    in_flight: deque[tuple[SelectedFrame, Future]] = deque()
    keyframes: list[NewKeyframe] = []
    step = core.config.batcher.max_batch
    reported = time.monotonic()
    first_time = core.index.id_holder(video_id) is None
    record = {"source": source, "metadata": metadata}

    def check_cancelled() -> None:
        if cancelled is not None and cancelled.is_set():
            raise CancelledError(f"indexing of video {video_id!r} was cancelled")

    def report(force: bool = False) -> None:
        nonlocal reported
        if force or time.monotonic() - reported >= core.config.video.progress_interval_s:
            progress(state)
            reported = time.monotonic()

    def collect(block: bool) -> None:
        """Take the keyframes described so far, in order (`block`: wait for all), committing a new video's
        as each batch comes back."""
        nonlocal state
        while in_flight and (block or in_flight[0][1].done()):
            check_cancelled()
            in_flight[0][1].result()  # the oldest; those described with it come along
            new = []
            while in_flight and in_flight[0][1].done():
                selected, future = in_flight.popleft()
                described = future.result()
                new.append(new_keyframe(video_id, selected, described))
                state = replace(
                    state,
                    keyframes_indexed=state.keyframes_indexed + 1,
                    regions=state.regions + region_count(described),
                )
            keyframes.extend(new)
            if first_time:
                core.append_keyframes(video_id, new, live=False, **record)
                state = replace(state, keyframes_committed=len(keyframes))
            report()

    def submit() -> None:
        futures = core.submit_describe([s.inp for s in batch], deadline, wait=True)
        in_flight.extend(zip(batch, futures))
        batch.clear()

    try:
        for frame, selected, shots in selected_frames(file, rules, core.config, core.pipeline.prepare):
            check_cancelled()
            if selected is not None:
                batch.append(selected)
                if len(batch) == step:
                    submit()
            state = replace(
                state,
                frames_decoded=state.frames_decoded + 1,
                keyframes_selected=state.keyframes_selected + (selected is not None),
                shots=shots,
                duration_s=frame.time_s,
            )
            collect(block=len(in_flight) > 2 * step)
            report()
        if batch:
            submit()
        collect(block=True)
        if not keyframes:
            raise VideoError("no keyframe could be selected (no intra frames?)")
        replaced = 0 if first_time else core.store_video(video_id, keyframes, **record)
    finally:
        for _, future in in_flight:
            future.cancel()
    state = replace(state, keyframes_committed=len(keyframes), replaced=replaced, done=True)
    report(force=True)
    return state
