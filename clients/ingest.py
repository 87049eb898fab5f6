"""Feeding a live stream from a camera, RTSP, HTTP or a file (`inserve ingest URL`), through broken connections.

The server makes a keyframe durable before it acknowledges it and skips frames at or before the last one it
holds, so reconnecting is safe: the frames sent since the last acknowledged keyframe are kept (at most
`replay` of them) and sent again on the next connection. A source that produced more than that during an
outage loses the oldest; a live source cannot be paused anyway.
"""

from __future__ import annotations

import functools
import io
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator

import av
import grpc

from inserve.clients.client import InstanceSearchClient, LiveStreamSpec
from inserve.v1 import inserve_pb2 as pb

log = logging.getLogger(__name__)

# worth another connection: the server went away, is full, or still holds the connection that broke
RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)


def source_frames(
    url: str, *, realtime: bool = False, wall_clock: bool = False, raw: bool = False, jpeg_quality: int = 90
) -> Iterator[pb.LiveFrame]:
    """The first video stream of `url` (a file, http(s)://, rtsp://, or a device PyAV opens) as frames.

    realtime: a file is read at its own frame rate, as a camera would send it (live sources always are).
    wall_clock: frames carry the time they were read (seconds since the epoch) instead of the stream's own
    presentation time, so that a stream id survives a restarted camera or client (times must keep increasing).
    raw: send rgb24 pixels instead of JPEG (no encoding cost, several times the bytes).
    """
    with av.open(url, mode="r", timeout=10.0) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = float(stream.average_rate) if stream.average_rate else 25.0
        origin, started = None, time.monotonic()
        for count, frame in enumerate(container.decode(stream)):
            stream_s = frame.time if frame.time is not None else count / rate
            origin = stream_s if origin is None else origin
            stream_s -= origin
            if realtime and (ahead := started + stream_s - time.monotonic()) > 0:
                time.sleep(ahead)
            message = pb.LiveFrame(time_s=time.time() if wall_clock else stream_s)
            if raw:
                pixels = frame.to_ndarray(format="rgb24")
                message.raw.CopyFrom(
                    pb.RawPixels(
                        width=frame.width,
                        height=frame.height,
                        format=pb.PIXEL_FORMAT_RGB24,
                        data=pixels.tobytes(),
                    )
                )
            else:
                encoded = io.BytesIO()
                frame.to_image().save(encoded, "JPEG", quality=jpeg_quality)
                message.image = encoded.getvalue()
            yield message


class LiveIngest:
    """Streams `frames` into the live stream `stream` and reconnects, with exponential backoff, when the
    connection breaks or the server is busy; gives up after `retries` failed attempts in a row."""

    def __init__(
        self,
        client: InstanceSearchClient,
        stream: LiveStreamSpec,
        frames: Iterable[pb.LiveFrame],
        *,
        replay: int = 256,
        retries: int = 8,
        backoff_s: float = 0.25,
        max_backoff_s: float = 8.0,
    ) -> None:
        self.client, self.stream = client, stream
        self.retries, self.backoff_s, self.max_backoff_s = retries, backoff_s, max_backoff_s
        self.reconnections = 0
        self._source = iter(frames)
        self._replay: deque[pb.LiveFrame] = deque(maxlen=replay)  # sent, not yet behind an acknowledged keyframe
        self._lock = threading.Lock()  # one connection's request thread pulls the source at a time
        self._connection = 0

    def events(self) -> Iterator[pb.LiveStreamEvent]:
        """Every connection's events (each starts with `opened`) until the source ends and the server has
        acknowledged all of it; raises grpc.RpcError for a refusal that retrying cannot cure."""
        failures = 0
        while True:
            with self._lock:
                self._connection += 1
                connection = self._connection
            try:
                for event in self.client.index_live_stream(
                    self.stream, functools.partial(self._frames, connection=connection)
                ):
                    failures = 0
                    kind = event.WhichOneof("event")
                    if kind == "keyframe":
                        self._forget(event.keyframe.keyframe.time_s)
                    elif kind == "dropped":
                        self._forget(event.dropped.until_s)
                    yield event
                return
            except grpc.RpcError as exc:
                if exc.code() not in RETRYABLE or failures >= self.retries:
                    raise
                delay = min(self.max_backoff_s, self.backoff_s * 2**failures)
                failures += 1
                self.reconnections += 1
                log.warning(
                    "live stream %r: %s (%s); reconnecting in %.2f s",
                    self.stream.id,
                    exc.code().name,
                    exc.details(),
                    delay,
                )
                time.sleep(delay)

    def _forget(self, until_s: float) -> None:
        with self._lock:
            while self._replay and self._replay[0].time_s <= until_s:
                self._replay.popleft()

    def _frames(self, opened: pb.LiveStreamOpened, connection: int) -> Iterator[pb.LiveFrame]:
        """What one connection sends: the kept frames after the server's resume point, then the source."""
        sent = opened.resume_after_s if opened.HasField("resume_after_s") else -math.inf
        self._forget(sent)
        while True:
            with self._lock:
                if connection != self._connection:  # a broken connection's thread; the next one took over
                    return
                frame = next((f for f in self._replay if f.time_s > sent), None)
                if frame is None:
                    frame = next(self._source, None)
                    if frame is None:
                        return
                    self._replay.append(frame)
            sent = frame.time_s
            yield frame
