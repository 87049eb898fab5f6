"""How SQLite holds raw vectors (server/index/codec.py): float32 exactly, int8 within half a step."""

from __future__ import annotations

import numpy as np
import pytest

from inserve.server.index.codec import as_stored, decode_vector, decode_vectors, encode_vector


def test_float32_round_trips_exactly_as_plain_bytes() -> None:
    v = np.array([0.5, -1.25, 3.0], dtype=np.float32)
    blob = encode_vector(v)
    assert blob == v.tobytes()  # what every earlier index holds
    np.testing.assert_array_equal(decode_vector(blob), v)


def test_int8_by_hand() -> None:
    v = np.array([1.27, -0.635, 0.0, 0.004], dtype=np.float32)  # scale 0.01: 127, -63.5 -> -64, 0, 0.4 -> 0
    blob = encode_vector(v, int8=True)
    assert len(blob) % 4 == 1
    assert blob[0] == len(blob) - 1 - 4 - 4  # pad bytes after the scale and 4 values
    np.testing.assert_allclose(decode_vector(blob), [1.27, -0.64, 0.0, 0.0], atol=1e-6)


@pytest.mark.parametrize("dim", [1, 2, 3, 4, 5, 8, 1280])
def test_int8_blob_is_never_a_multiple_of_4_and_decodes_to_its_dimension(dim: int) -> None:
    v = np.random.default_rng(dim).normal(size=dim).astype(np.float32)
    blob = encode_vector(v, int8=True)
    assert len(blob) % 4 == 1 and len(blob) <= dim + 8
    decoded = decode_vector(blob)
    assert decoded.shape == (dim,)
    assert np.abs(decoded - v).max() <= np.abs(v).max() / 127 / 2 + 1e-7  # within half a step


def test_int8_cosine_error_of_a_region_vector_is_small() -> None:
    rng = np.random.default_rng(0)
    v = np.abs(rng.normal(size=(50, 1280))).astype(np.float32)  # non-negative, like GeM
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    decoded = decode_vectors([encode_vector(x, int8=True) for x in v])
    decoded /= np.linalg.norm(decoded, axis=1, keepdims=True)
    assert np.abs(decoded @ v.T - v @ v.T).max() < 1e-3


def test_zero_vector_round_trips() -> None:
    np.testing.assert_array_equal(decode_vector(encode_vector(np.zeros(6), int8=True)), np.zeros(6))


def test_vectors_as_stored_are_what_decoding_their_bytes_gives() -> None:
    """A space filled write by write takes its vectors in this form, so that it holds what a rebuild from the
    store holds: int8 rounding where the space stores int8, the vectors themselves otherwise."""
    raw = np.random.default_rng(3).normal(size=(4, 16)).astype(np.float32)
    np.testing.assert_array_equal(as_stored(raw, True), decode_vectors([encode_vector(v, int8=True) for v in raw]))
    assert not np.array_equal(as_stored(raw, True), raw)
    assert as_stored(raw, False) is raw
