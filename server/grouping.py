"""Result lists grouped as TRECVID wants them: one entry per video or per shot, its best keyframe."""

from __future__ import annotations

from collections.abc import Hashable

from inserve.server.index import ImageRow
from inserve.server.search import GROUPINGS, Hit


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
