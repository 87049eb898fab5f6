"""How SQLite holds a raw vector: float32 bytes, or int8 with one scale for compact spaces.

SQLite keeps every vector at its full dimension, whatever the graph holds, so that whitening and PCA can be
learned again from it. A compact space's graph holds a PCA reduction; its raw vectors are only read back to
learn the reduction again, to rebuild the graph and to score an image's regions, where int8 (one float32 scale
per vector, max |x| / 127) costs a quarter of the bytes and a cosine error of 1.5e-4 (median; 1.4e-3 at most)
between holidays-dev's region vectors.

The blob says which it is: float32 blobs are a multiple of 4 bytes long; int8 blobs are one header byte (the
count of trailing pad bytes), the scale, the values and 0-3 pad bytes, padded to 1 more than a multiple of 4.
"""

from __future__ import annotations

import numpy as np

_SCALE = np.dtype("<f4")


def encode_vector(vector: np.ndarray, int8: bool = False) -> bytes:
    """One vector (D,) as the bytes SQLite stores."""
    vector = np.ascontiguousarray(vector, dtype="<f4").reshape(-1)
    if not int8:
        return vector.tobytes()
    peak = float(np.abs(vector).max(initial=0.0))
    scale = peak / 127.0 if peak > 0 else 1.0
    values = np.clip(np.rint(vector / scale), -127, 127).astype(np.int8)
    pad = (1 - (1 + _SCALE.itemsize + len(values))) % 4
    return bytes([pad]) + np.asarray(scale, dtype=_SCALE).tobytes() + values.tobytes() + bytes(pad)


def decode_vector(blob: bytes) -> np.ndarray:
    """The float32 vector (D,) of a stored blob, whichever encoding it has."""
    if len(blob) % 4 == 0:
        return np.frombuffer(blob, dtype="<f4").astype(np.float32, copy=False)
    pad = blob[0]
    scale = np.frombuffer(blob, dtype=_SCALE, count=1, offset=1)[0]
    values = np.frombuffer(blob[: len(blob) - pad], dtype=np.int8, offset=1 + _SCALE.itemsize)
    return values.astype(np.float32) * np.float32(scale)


def decode_vectors(blobs: list[bytes]) -> np.ndarray:
    """Stored blobs -> (N, D) float32."""
    return np.stack([decode_vector(b) for b in blobs])


def as_stored(raw: np.ndarray, int8: bool) -> np.ndarray:
    """Vectors (N, D) as decoding their stored bytes gives them back: what a space rebuilt from the store holds,
    so that a space filled write by write holds the same."""
    if not int8:
        return raw
    return decode_vectors([encode_vector(row, int8=True) for row in np.asarray(raw, dtype=np.float32)])
