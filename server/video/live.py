"""Live streams: keyframes picked from frames as they arrive, described through the shared batcher and committed
as soon as they are described, so that each one is searchable about one describe after it arrived.

A stream is a video whose keyframes are appended: their ids are "<stream id>#<milliseconds>", so a keyframe
sent again after a broken connection has the id it had and is never stored twice, and a reopened stream
continues after its last stored keyframe (frames at or before it are skipped). At most VideoConfig.live_window
keyframes of a stream are being described or waiting to be; beyond that the stream's overload policy either
stops reading (the sender is slowed by gRPC flow control) or drops the frames the client did not mark as
keyframes, before decoding them. Memory per stream is bounded by the window, whatever the sender does.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from PIL import Image

from inserve.server.config import OVERLOADS, ImageConfig
from inserve.server.errors import ImageError, RequestError
from inserve.server.imaging import check_size
from inserve.server.index.store import LiveResume
from inserve.server.instance_search import InstanceSearch
from inserve.server.recipes import ImageVectors
from inserve.server.video.indexer import SelectedFrame, new_keyframe, region_count
from inserve.server.video.keyframes import KeyframeSelector, SelectionRules, chi_square, colour_histogram

PIXEL_FORMATS = {"rgb24": 3, "bgr24": 3, "gray8": 1}  # raw pixel formats and their bytes per pixel
MAX_TIME_S = 1e12  # ~31,700 years: wall-clock seconds fit, and milliseconds stay within 20 digits


def keyframe_ms(time_s: float) -> int:
    """The millisecond a keyframe's id counts, halves rounded up: two keyframes of a stream must have different
    ones (round() would send 0.0015 and 0.0025 s both to 2)."""
    return math.floor(time_s * 1000 + 0.5)


T = TypeVar("T")


def raw_image(width: int, height: int, pixel_format: str, data: bytes, limits: ImageConfig) -> Image.Image:
    """An RGB image from raw pixels, checked against the image limits (ImageError when they do not fit)."""
    if pixel_format not in PIXEL_FORMATS:
        raise ImageError(f"unknown pixel format {pixel_format!r}; choose one of {', '.join(PIXEL_FORMATS)}")
    check_size(width, height, limits)
    channels = PIXEL_FORMATS[pixel_format]
    if len(data) != width * height * channels:
        raise ImageError(
            f"{pixel_format} pixels of {width}x{height} take {width * height * channels} bytes, got {len(data)}"
        )
    pixels = np.frombuffer(data, np.uint8).reshape(height, width, channels)
    if pixel_format == "bgr24":
        pixels = pixels[:, :, ::-1]
    elif pixel_format == "gray8":
        pixels = np.repeat(pixels, 3, axis=2)
    return Image.fromarray(np.ascontiguousarray(pixels), "RGB")


@dataclass(frozen=True)
class LiveFrame:
    time_s: float
    decode: Callable[[], Image.Image]  # the frame's pixels; raises ImageError
    keyframe: bool  # marked by the client
    arrived: float  # time.monotonic() when it reached the server


@dataclass(frozen=True)
class KeyframeCommitted:
    external_id: str
    frame: int  # the keyframe's time in milliseconds
    time_s: float
    shot: int
    regions: int
    latency_s: float  # from the frame's arrival to its commit


@dataclass(frozen=True)
class FramesDropped:
    frames: int
    until_s: float  # time of the last frame dropped


@dataclass(frozen=True)
class FrameRejected:
    time_s: float
    error: Exception  # an ImageError or RequestError saying what is wrong with the frame


LiveEvent = KeyframeCommitted | FramesDropped | FrameRejected


@dataclass(frozen=True)
class _Keyframe:
    selected: SelectedFrame  # its frame number is the time in milliseconds
    arrived: float


class LiveSelection:
    """Which frames of one stream become keyframes: the IndexVideo rules on the frames' colour histograms, or
    the client's marks (the histograms of its keyframes then only count shots). Continues after `resume`."""

    def __init__(self, rules: SelectionRules, client_keyframes: bool, histogram_side: int, resume: LiveResume | None):
        self.client_keyframes = client_keyframes
        self.histogram_side = histogram_side
        self.selector = KeyframeSelector(rules)
        self._last_keyframe: tuple[int, float] | None = None  # (id millisecond, time) of the last keyframe
        self._previous: np.ndarray | None = None
        if resume is not None:
            self.selector.resume(resume.last_time_s, resume.last_shot)
            self._last_keyframe = (keyframe_ms(resume.last_time_s), resume.last_time_s)

    @property
    def shot(self) -> int:
        return self.selector.shot

    def wants_pixels(self, frame: LiveFrame) -> bool:
        """Whether the frame must be decoded to decide (client-chosen keyframes decide without pixels)."""
        return frame.keyframe or not self.client_keyframes

    def offer(self, time_s: float, image: Image.Image, marked: bool) -> bool:
        histogram = colour_histogram(np.asarray(_small(image, self.histogram_side)))
        if not self.client_keyframes:
            chosen = self.selector.offer(time_s, histogram)
        else:
            chosen = marked
            if chosen and self._previous is not None:
                self.selector.shot += chi_square(histogram, self._previous) > self.selector.rules.scene_threshold
            self._previous = histogram if chosen else self._previous
        if chosen and self._last_keyframe is not None and keyframe_ms(time_s) <= self._last_keyframe[0]:
            raise RequestError(
                f"keyframe at {time_s!r} s falls in the millisecond of the one at {self._last_keyframe[1]!r} s "
                "(keyframe ids count milliseconds): keyframes must be in different milliseconds"
            )
        if chosen:
            self._last_keyframe = (keyframe_ms(time_s), time_s)
        return chosen


def _small(image: Image.Image, side: int) -> Image.Image:
    scale = side / max(image.size)
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.NEAREST)


class LiveStream:
    """One live stream, driven by one connection at a time (InstanceSearch.claim_live)."""

    def __init__(
        self,
        core: InstanceSearch,
        stream_id: str,
        rules: SelectionRules,
        *,
        client_keyframes: bool = False,
        overload: str = "wait",
        source: str = "",
        metadata: dict[str, str] | None = None,
    ) -> None:
        if overload not in OVERLOADS:
            raise RequestError(f"unknown overload policy {overload!r}; choose one of {', '.join(OVERLOADS)}")
        self.core, self.stream_id, self.overload = core, stream_id, overload
        self.source, self.metadata = source, metadata or {}
        self.resume = core.live_resume(stream_id)
        self.selection = LiveSelection(rules, client_keyframes, core.config.video.histogram_side, self.resume)
        self._last_time_s = -math.inf if self.resume is None else self.resume.last_time_s

    def take_time(self, time_s: float) -> None:
        """Frames come in presentation order, over the whole life of the stream id (RequestError otherwise)."""
        if not math.isfinite(time_s) or not 0 <= time_s <= MAX_TIME_S:
            raise RequestError(f"frame time must be a number of seconds in [0, {MAX_TIME_S:g}], got {time_s!r}")
        if time_s <= self._last_time_s:
            raise RequestError(f"frame time {time_s!r} does not come after the previous frame's {self._last_time_s!r}")
        self._last_time_s = time_s

    def already_stored(self, time_s: float) -> bool:
        """At or before the last keyframe an earlier connection committed: skipped, never indexed twice."""
        return self.resume is not None and time_s <= self.resume.last_time_s

    def select(self, frame: LiveFrame) -> _Keyframe | None:
        """Blocking (decodes): the frame as a keyframe ready to describe, or None."""
        self.take_time(frame.time_s)
        if not self.selection.wants_pixels(frame):
            return None
        image = frame.decode()
        if not self.selection.offer(frame.time_s, image, frame.keyframe):
            return None
        inp = self.core.pipeline.prepare(image)
        return _Keyframe(
            SelectedFrame(keyframe_ms(frame.time_s), frame.time_s, self.selection.shot, inp), frame.arrived
        )

    def commit(self, described: list[tuple[_Keyframe, dict[str, ImageVectors]]]) -> list[KeyframeCommitted]:
        """Blocking: append described keyframes in one transaction; what a resent stream repeats is skipped."""
        records = {}
        for keyframe, vectors in described:
            record = new_keyframe(self.stream_id, keyframe.selected, vectors)
            records[record.external_id] = (keyframe, vectors, record)
        added = self.core.append_keyframes(
            self.stream_id, [r for _, _, r in records.values()], live=True, source=self.source, metadata=self.metadata
        )
        now = time.monotonic()
        committed = []
        for stored in added:
            keyframe, vectors, _ = records[stored.external_id]
            latency = now - keyframe.arrived
            self.core.live_latency.observe(latency)
            committed.append(
                KeyframeCommitted(
                    stored.external_id, stored.frame, stored.time_s, stored.shot, region_count(vectors), latency
                )
            )
        return committed


async def index_live(
    stream: LiveStream,
    frames: AsyncIterator[LiveFrame],
    run: Callable[[Callable[[], T]], Awaitable[T]],
) -> AsyncIterator[LiveEvent]:
    """Events in frame order while the frames come: each keyframe once committed, drops, rejected frames.
    `run(fn)` runs blocking work (decoding, commits) off the event loop. A bad frame is rejected and the
    stream goes on; closing the generator stops reading and cancels what is being described."""
    core = stream.core
    room = asyncio.Semaphore(core.config.video.live_window)
    pending: asyncio.Queue[tuple[_Keyframe, asyncio.Future] | FramesDropped | FrameRejected | None] = asyncio.Queue()

    async def read() -> None:
        dropped, until_s = 0, 0.0
        try:
            async for frame in frames:
                if stream.already_stored(frame.time_s):
                    continue
                if stream.overload == "drop" and room.locked() and not frame.keyframe:
                    try:
                        stream.take_time(frame.time_s)
                    except RequestError as exc:
                        pending.put_nowait(FrameRejected(frame.time_s, exc))
                        continue
                    dropped, until_s = dropped + 1, frame.time_s
                    continue
                if dropped:
                    pending.put_nowait(FramesDropped(dropped, until_s))
                    dropped = 0
                await room.acquire()
                try:
                    keyframe = await run(lambda frame=frame: stream.select(frame))
                except (ImageError, RequestError) as exc:
                    room.release()
                    pending.put_nowait(FrameRejected(frame.time_s, exc))
                    continue
                if keyframe is None:
                    room.release()
                    continue
                (future,) = await run(
                    lambda keyframe=keyframe: core.submit_describe([keyframe.selected.inp], wait=True)
                )
                pending.put_nowait((keyframe, asyncio.wrap_future(future)))
            if dropped:
                pending.put_nowait(FramesDropped(dropped, until_s))
        finally:
            pending.put_nowait(None)

    reader = asyncio.ensure_future(read())
    lookahead: list = []  # an item taken from the queue while gathering a batch, to be handled next
    held: list[tuple[_Keyframe, asyncio.Future]] = []
    try:
        while (item := lookahead.pop() if lookahead else await pending.get()) is not None:
            if not isinstance(item, tuple):
                yield item
                continue
            held = [item]
            await item[1]
            while not pending.empty():  # keyframes described meanwhile join this commit
                following = pending.get_nowait()
                if not (isinstance(following, tuple) and following[1].done()):
                    lookahead.append(following)
                    break
                held.append(following)
            described = [(keyframe, future.result()) for keyframe, future in held]
            committed = await run(lambda described=described: stream.commit(described))
            for _ in held:
                room.release()
            held = []
            for event in committed:
                yield event
        await reader
    finally:
        reader.cancel()
        for item in [*held, *lookahead]:
            if isinstance(item, tuple):
                item[1].cancel()
        while not pending.empty():
            item = pending.get_nowait()
            if isinstance(item, tuple):
                item[1].cancel()
