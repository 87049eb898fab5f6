"""Every error the service raises on purpose, in one place, each with the gRPC status it is answered with.

Two families: errors of a request (the caller sent something the server cannot take, or came at a bad time),
which the servicer turns into the status named by the class's `status` (server/grpc/servicer.py `status_of`), and
errors of the setup (flags, files, models), which stop the server before it serves with one line saying what
is wrong. The classes keep the builtin bases callers may already catch (ValueError, KeyError, ...). The
status is a name, so that the core needs no gRPC.
"""

from __future__ import annotations


class InserveError(Exception):
    """Any error inserve raises on purpose; `status` is the gRPC code a request gets for it."""

    status = "UNKNOWN"


# --- errors of a request ---


class RequestError(InserveError, ValueError):
    """A request that cannot be served as asked (unknown recipe, bad top_k...); the message says why."""

    status = "INVALID_ARGUMENT"


class UnavailableError(RequestError):
    """The recipe asked for cannot run on this server (no detector file, no codebook...): what is missing."""

    status = "FAILED_PRECONDITION"


class ImageError(RequestError):
    """The bytes are not an image this service can index; the message says why."""


class VideoError(RequestError):
    """Not a video this service can decode (corrupt, truncated, no video stream, unsupported codec)."""


class IdError(RequestError):
    """An id the scheme does not allow (server/ids.py)."""


class DuplicateId(InserveError, KeyError):
    """The external id is taken: by an image already indexed, or by an image where a video wants it (or the
    other way round: image and video ids share one namespace, server/ids.py)."""

    status = "ALREADY_EXISTS"
    TAKEN = "already indexed (set replace to re-index)"

    def __init__(self, external_id: str, reason: str = TAKEN) -> None:
        super().__init__(external_id)
        self.external_id, self.reason = external_id, reason

    def __str__(self) -> str:
        return self.reason


class LiveStreamBusy(InserveError):
    """Another connection is writing to this live stream (the one before a reconnection may not have ended
    yet, or one on another replica of a shared store): retry shortly."""

    status = "ABORTED"

    def __init__(self, stream_id: str) -> None:
        super().__init__(f"another connection is indexing live stream {stream_id!r}; retry shortly")


class MediaAccessDenied(InserveError, PermissionError):
    """The path lies outside the media root, or the server has none."""

    status = "PERMISSION_DENIED"


class Overloaded(InserveError, RuntimeError):
    """The batcher's queue (or another limit) is full: retry later."""

    status = "RESOURCE_EXHAUSTED"


class DeadlineExceeded(InserveError, TimeoutError):
    """The job's deadline passed before it could run."""

    status = "DEADLINE_EXCEEDED"


class BatcherClosed(InserveError, RuntimeError):
    """The batcher stopped before the job ran (the server is shutting down)."""

    status = "UNAVAILABLE"


class StoreUnavailable(InserveError, ConnectionError):
    """The shared vector store (Milvus) cannot be reached, or changed under a search: retry; the server goes
    on serving and recovers when the store is back."""

    status = "UNAVAILABLE"


# --- errors of the setup: the server does not start ---


class ConfigError(InserveError, ValueError):
    """A setting, or a combination of settings, that cannot work; the message says what is valid."""


class SecurityError(ConfigError):
    """The security settings cannot be used (a missing file, a key without a certificate...)."""


class ModelsError(InserveError, RuntimeError):
    """The models directory is missing, incomplete or does not match its manifest."""


class RecipeUnavailable(InserveError, RuntimeError):
    """A recipe cannot run here (e.g. no detector file, no codebook); the message says what is missing."""


# what a request can fail with, answered with the status `status_name` gives; anything else is a bug (UNKNOWN)
REQUEST_ERRORS = (
    RequestError,
    DuplicateId,
    LiveStreamBusy,
    MediaAccessDenied,
    Overloaded,
    DeadlineExceeded,
    BatcherClosed,
    StoreUnavailable,
    FileNotFoundError,  # a media file named by a request that is not there
)


def status_name(error: BaseException) -> str:
    """The gRPC status code name a request error is answered with."""
    if isinstance(error, InserveError):
        return error.status
    return "NOT_FOUND" if isinstance(error, FileNotFoundError) else InserveError.status
