"""The id scheme: images and videos are named by their callers, keyframes by the server.

An image id and a video id share one namespace, and neither may contain KEYFRAME_SEPARATOR: keyframe ids are
"<video id>#<frame>", so no caller id can ever collide with a keyframe, and every id the server creates stays
within MAX_KEYFRAME_ID_LENGTH and can be deleted. Delete takes either kind: an image id, a video id (all its
keyframes) or one keyframe id. Indexes written before the rule may hold image ids with '#': they are still
found and deleted.
"""

from __future__ import annotations

from inserve.server.errors import IdError

MAX_ID_LENGTH = 512  # characters of an image or video id
KEYFRAME_SEPARATOR = "#"
MAX_KEYFRAME_ID_LENGTH = MAX_ID_LENGTH + len(KEYFRAME_SEPARATOR) + 20  # a frame number is at most 20 digits


def check_id(external_id: str, what: str = "id") -> None:
    """An image or video id as a caller may choose it."""
    if not external_id:
        raise IdError(f"{what} is empty")
    if len(external_id) > MAX_ID_LENGTH:
        raise IdError(f"{what} is {len(external_id)} characters long, at most {MAX_ID_LENGTH}")
    if KEYFRAME_SEPARATOR in external_id:
        raise IdError(
            f"{what} contains {KEYFRAME_SEPARATOR!r}, which only keyframe ids (<video id>{KEYFRAME_SEPARATOR}<frame>)"
            " may; put URLs and paths in `source`"
        )


def check_deletable_id(external_id: str) -> None:
    """Anything Delete may name: what check_id allows, a keyframe id, or an older image id with '#'."""
    if not external_id:
        raise IdError("id is empty")
    if len(external_id) > MAX_KEYFRAME_ID_LENGTH:
        raise IdError(f"id is {len(external_id)} characters long, at most {MAX_KEYFRAME_ID_LENGTH}")


def keyframe_id(video_id: str, frame: int) -> str:
    """External id of a keyframe: its video's id and its frame number."""
    return f"{video_id}{KEYFRAME_SEPARATOR}{frame}"
