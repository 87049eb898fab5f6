"""Conversions between inserve.v1 messages and the core's types, in one place: requests to core arguments,
results and events to messages, and core errors to a status code with a message."""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator
from dataclasses import asdict

import grpc

from inserve.server.config import ImageConfig, VideoConfig
from inserve.server.errors import ImageError, RequestError, status_name
from inserve.server.grouping import grouping_name
from inserve.server.imaging import decode_image
from inserve.server.instance_search import Indexed
from inserve.server.search import Hit, SearchOptions
from inserve.server.video.indexer import VideoProgress
from inserve.server.video.keyframes import SelectionRules
from inserve.server.video.live import (
    FrameRejected,
    FramesDropped,
    KeyframeCommitted,
    LiveEvent,
    LiveFrame,
    raw_image,
)
from inserve.v1 import inserve_pb2 as pb

MAX_DETAILS = 2000  # characters of a status message


class Failed(Exception):
    """A request error with what it concerned (`image 'x'`), for the status message."""

    def __init__(self, what: str, error: Exception) -> None:
        super().__init__(f"{what}: {error}")
        self.what, self.error = what, error


def shown(external_id: str, limit: int = 64) -> str:
    """An id quoted for a message, cut short when long (the status details echo it to the caller)."""
    return repr(external_id) if len(external_id) <= limit else f"{external_id[:limit]!r}... ({len(external_id)} chars)"


def elided(message: str, limit: int = MAX_DETAILS) -> str:
    """At most `limit` characters: the start and the end (where the reason is) of a longer message. Status
    details travel as trailing metadata, which the client refuses beyond a few KiB."""
    if len(message) <= limit:
        return message
    half = (limit - 5) // 2
    return f"{message[:half]} ... {message[-half:]}"


def status_of(exc: Exception) -> tuple[grpc.StatusCode, str]:
    """The status code and message for a request error (wrapped in Failed or not)."""
    error, what = (exc.error, exc.what) if isinstance(exc, Failed) else (exc, "")
    code = grpc.StatusCode[status_name(error)]  # each error class names its status (server/errors.py)
    message = str(error)
    return code, elided(f"{what}: {message}" if what else message)


def selection_rules(config: VideoConfig, options: pb.KeyframeOptions) -> SelectionRules:
    """The server's keyframe selection defaults with what the request overrides."""
    try:
        return SelectionRules(
            options.scene_threshold if options.HasField("scene_threshold") else config.scene_threshold,
            options.min_interval_s if options.HasField("min_interval_s") else config.min_interval_s,
            options.max_interval_s if options.HasField("max_interval_s") else config.max_interval_s,
            options.iframes_only if options.HasField("iframes_only") else config.iframes_only,
        )
    except ValueError as exc:
        raise RequestError(str(exc)) from exc


def box_tuple(message: pb.Box) -> tuple[float, float, float, float]:
    return (message.x1, message.y1, message.x2, message.y2)


def box_message(box: tuple[float, ...]) -> pb.Box:
    return pb.Box(x1=box[0], y1=box[1], x2=box[2], y2=box[3])


def search_options(message: pb.SearchOptions) -> SearchOptions:
    """Absent numbers stay None: the recipe's defaults apply."""
    try:
        group = grouping_name(message.group)
    except ValueError as exc:
        raise RequestError(str(exc)) from exc
    return SearchOptions(
        query_expansion=message.query_expansion if message.HasField("query_expansion") else None,
        rerank_top=message.rerank_top if message.HasField("rerank_top") else None,
        group=group,
    )


def enum_name(enum: object, value: int, prefix: str) -> str:
    """A proto enum value as the core names it: OVERLOAD_DROP -> "drop" (RequestError for an unknown value)."""
    if value not in enum.values():
        raise RequestError(f"unknown {prefix.rstrip('_').lower()} {value}")
    return enum.Name(value).removeprefix(prefix).lower()


async def live_frames(requests: AsyncIterator[pb.LiveStreamRequest], limits: ImageConfig) -> AsyncIterator[LiveFrame]:
    """The frames of a live stream, each with when it arrived and how to decode it (off the event loop)."""
    async for request in requests:
        arrived = time.monotonic()
        if request.WhichOneof("part") != "frame":
            raise RequestError("only frames may follow the live stream header")
        frame = request.frame
        kind = frame.WhichOneof("pixels")
        if kind == "image":
            decode = functools.partial(decode_image, frame.image, limits)
        elif kind == "raw":
            raw = frame.raw
            try:  # a value the proto does not define is the frame's fault, rejected by raw_image like "unspecified"
                pixel_format = enum_name(pb.PixelFormat, raw.format, "PIXEL_FORMAT_")
            except RequestError:
                pixel_format = str(raw.format)
            decode = functools.partial(raw_image, raw.width, raw.height, pixel_format, raw.data, limits)
        else:
            decode = functools.partial(_no_pixels, frame.time_s)
        yield LiveFrame(frame.time_s, decode, frame.keyframe, arrived)


def _no_pixels(time_s: float) -> None:
    raise ImageError(f"frame at {time_s!r} s has neither an image nor raw pixels")


def live_event_message(stream_id: str, event: LiveEvent) -> pb.LiveStreamEvent:
    if isinstance(event, KeyframeCommitted):
        keyframe = pb.Keyframe(video_id=stream_id, frame=event.frame, time_s=event.time_s, shot=event.shot)
        return pb.LiveStreamEvent(
            keyframe=pb.LiveKeyframeAck(
                id=event.external_id, keyframe=keyframe, regions=event.regions, latency_s=event.latency_s
            )
        )
    if isinstance(event, FramesDropped):
        return pb.LiveStreamEvent(dropped=pb.LiveFramesDropped(frames=event.frames, until_s=event.until_s))
    assert isinstance(event, FrameRejected)
    code, message = status_of(event.error)
    return pb.LiveStreamEvent(
        rejected=pb.LiveFrameRejected(time_s=event.time_s, error_code=code.value[0], error=message)
    )


def ack_message(indexed: Indexed) -> pb.IndexImageAck:
    regions = [
        pb.Region(box=box_message(box), score=float(score))
        for described in indexed.described.values()
        for box, score in zip(described.regions.boxes, described.regions.scores)
    ]
    return pb.IndexImageAck(
        id=indexed.external_id,
        width=indexed.width,
        height=indexed.height,
        regions=regions,
        recipes=list(indexed.described),
    )


def progress_message(progress: VideoProgress) -> pb.IndexVideoProgress:
    return pb.IndexVideoProgress(**asdict(progress))


def hit_message(rank: int, hit: Hit, thumbnail: bytes = b"") -> pb.SearchHit:
    message = pb.SearchHit(
        rank=rank,
        id=hit.image.external_id,
        score=hit.score,
        source=hit.image.source,
        metadata=hit.image.metadata,
        width=hit.image.width,
        height=hit.image.height,
        region_score=hit.region_score,
        thumbnail=thumbnail,
        region_source=hit.region_source,
    )
    if hit.box is not None:
        message.box.CopyFrom(box_message(hit.box))
    image = hit.image
    if image.video_id is not None:
        message.keyframe.CopyFrom(
            pb.Keyframe(video_id=image.video_id, frame=image.frame, time_s=image.time_s, shot=image.shot)
        )
    return message
