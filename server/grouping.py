"""Result lists grouped as TRECVID wants them: one entry per video or per shot, its best keyframe."""

from __future__ import annotations

from collections.abc import Hashable
from typing import TYPE_CHECKING

from inserve.v1 import inserve_pb2 as pb

if TYPE_CHECKING:  # the client imports this module for the names; it needs no index
    from inserve.server.index import ImageRow
    from inserve.server.search import Hit

# the proto's Grouping enum is the one list: GROUPING_NONE -> "none", ...
GROUPINGS = tuple(v.name.removeprefix("GROUPING_").lower() for v in pb.Grouping.DESCRIPTOR.values)


def grouping_name(value: int) -> str:
    """The grouping a proto Grouping value stands for (ValueError for a value the proto does not define)."""
    if value not in pb.Grouping.values():
        raise ValueError(f"unknown grouping {value}")
    return pb.Grouping.Name(value).removeprefix("GROUPING_").lower()


def grouping_value(name: str) -> int:
    """The proto Grouping value of a grouping name."""
    if name not in GROUPINGS:
        raise ValueError(f"unknown grouping {name!r}; choose one of {GROUPINGS}")
    return pb.Grouping.Value("GROUPING_" + name.upper())


def group_key(image: ImageRow, group: str) -> Hashable:
    """What one result list entry stands for; an image that is no keyframe stands for itself."""
    if image.video_id is None or group == "none":
        return ("image", image.id)
    if group == "video":
        return ("video", image.video_id)
    return ("shot", image.video_id, image.shot)


def group_hits(hits: list[Hit], group: str) -> list[Hit]:
    """The best hit of each group, best first (hits come best first)."""
    if group not in GROUPINGS:
        raise ValueError(f"unknown grouping {group!r}; choose one of {GROUPINGS}")
    seen: set[Hashable] = set()
    grouped = []
    for hit in hits:
        key = group_key(hit.image, group)
        if key not in seen:
            seen.add(key)
            grouped.append(hit)
    return grouped
