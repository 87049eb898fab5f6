"""One contract, both stores: the data directory (hnswlib + SQLite) and Milvus (milvus-lite, a real Milvus
engine embedded). Every test runs on each and checks what the rest of the server relies on."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from inserve.server.config import IndexConfig
from inserve.server.index import DuplicateId, NewKeyframe, NewVectors, SpaceSpec
from inserve.server.index.transforms import due

DIM = 8
RECIPE = "dasr_star"
CONFIG = IndexConfig(auto_whiten_per_dim=4.0, compact_dims=4, compact_after=8)
SPECS = {("compact", "region"): SpaceSpec(whiten=False, compact=True)}

Opener = Callable[[], object]


@pytest.fixture
def reopen(open_store: Callable):
    return lambda: open_store(CONFIG, SPECS)


@pytest.fixture
def index(reopen: Opener):
    return reopen()


def regions(seed: int, n: int = 3, recipe: str = RECIPE) -> NewVectors:
    rng = np.random.default_rng(seed)
    raw = rng.normal(size=(n, DIM)).astype(np.float32) + 1.0
    boxes = np.array([[10 * i, 5 * i, 10 * i + 40, 5 * i + 30] for i in range(n)], dtype=np.float32)
    return NewVectors(recipe, "region", raw, boxes, np.arange(n, 0, -1, dtype=np.float32))


def add(index, name: str, seed: int, n: int = 3, recipe: str = RECIPE, **kwargs: object) -> NewVectors:
    vectors = regions(seed, n, recipe)
    index.add_image(name, [vectors], width=640, height=480, source=f"/photos/{name}", **kwargs)
    return vectors


def query(index, raw: np.ndarray, k: int = 5, recipe: str = RECIPE) -> list[tuple[str, float, tuple | None]]:
    """(external id, similarity rounded to 4 places, box) of the k nearest region vectors."""
    found = index.nearest(recipe, "region", index.transform(recipe, "region", raw), k)
    images = index.images([row.image_id for row, _ in found])
    return [(images[row.image_id].external_id, round(sim, 4), row.box) for row, sim in found]


def test_add_then_search_finds_the_vector_with_its_box(index) -> None:
    a = add(index, "a", 1)
    add(index, "b", 2)
    hits = query(index, a.raw[1])
    assert hits[0] == ("a", pytest.approx(1.0, abs=1e-4), (10.0, 5.0, 50.0, 35.0))
    assert len(hits) == 5
    assert index.contains("a") and not index.contains("c")
    assert index.count_images() == 2
    (stats,) = index.stats()
    assert (stats.recipe, stats.kind, stats.vectors, stats.dim, stats.whitening_version) == (RECIPE, "region", 6, 8, 0)


def test_image_rows_and_thumbnails_come_back(index) -> None:
    large = np.random.default_rng(0).integers(0, 256, 70_000, dtype=np.uint8).tobytes()  # base64 over 64 KiB
    index.add_image("m", [regions(0)], width=64, height=32, source="s", metadata={"k": "v"}, thumbnail=b"jpeg")
    index.add_image("big", [regions(1)], width=64, height=32, thumbnail=large)
    index.add_image("none", [regions(2)], width=64, height=32)
    rows = {row.external_id: row for row in index.images(_all_image_ids(index)).values()}
    m = rows["m"]
    assert (m.source, m.width, m.height, m.metadata, m.video_id) == ("s", 64, 32, {"k": "v"}, None)
    thumbnails = index.thumbnails([rows[name].id for name in ("m", "big", "none")])
    assert thumbnails == {rows["m"].id: b"jpeg", rows["big"].id: large}


def _all_image_ids(index) -> list[int]:
    found = index.nearest(RECIPE, "region", index.transform(RECIPE, "region", np.ones(DIM)), 100)
    return sorted({row.image_id for row, _ in found})


def test_duplicate_id_is_refused_and_changes_nothing(index) -> None:
    add(index, "a", 1)
    with pytest.raises(DuplicateId):
        add(index, "a", 2)
    assert index.count_images() == 1
    assert len(index.space(RECIPE, "region")) == 3


def test_replace_swaps_the_vectors(index) -> None:
    old = add(index, "a", 1)
    new = add(index, "a", 2, n=2, replace=True)
    assert index.count_images() == 1
    assert len(index.space(RECIPE, "region")) == 2
    assert query(index, new.raw[0])[0][1] == pytest.approx(1.0, abs=1e-4)
    assert all(sim < 0.9999 for _, sim, _ in query(index, old.raw[0]))


def test_delete_removes_hits_and_reports_missing_ids(index) -> None:
    a = add(index, "a", 1)
    add(index, "b", 2)
    assert index.delete(["a", "nope", "a"]) == (1, ["nope"])
    assert all(name == "b" for name, _, _ in query(index, a.raw[0]))
    assert len(index.space(RECIPE, "region")) == 3
    assert index.count_images() == 1
    assert index.delete(["a"]) == (0, ["a"])


def test_dimension_mismatch_is_refused(index) -> None:
    add(index, "a", 1)
    wrong = NewVectors(RECIPE, "region", np.ones((1, DIM + 1), dtype=np.float32))
    with pytest.raises(ValueError, match="have 8 dimensions in this index, got 9"):
        index.add_image("b", [wrong], width=10, height=10)
    assert not index.contains("b")


def test_reopen_gives_the_same_results(reopen: Opener) -> None:
    index = reopen()
    vectors = [add(index, f"img{i}", i) for i in range(5)]
    index.delete(["img2"])
    before = [query(index, v.raw[0], k=4) for v in vectors]
    index = reopen()
    assert [query(index, v.raw[0], k=4) for v in vectors] == before
    assert index.count_images() == 4 and len(index.space(RECIPE, "region")) == 12


def test_learned_whitening_serves_old_and_new_vectors_and_survives_reopening(reopen: Opener) -> None:
    index = reopen()
    vectors = [add(index, f"img{i}", i) for i in range(11)]
    assert due(index, RECIPE, "region")  # 33 vectors >= 4 per dimension
    assert index.learn_whitening(RECIPE, "region", dims=6) == 1
    assert not due(index, RECIPE, "region")
    (stats,) = index.stats()
    assert (stats.whitening_version, stats.dim, stats.vectors, index.learned_from(RECIPE, "region")) == (1, 6, 33, 33)
    late = add(index, "late", 99)
    for name, raw in (("img0", vectors[0].raw[1]), ("img7", vectors[7].raw[2]), ("late", late.raw[0])):
        assert query(index, raw)[0][:2] == (name, pytest.approx(1.0, abs=1e-4))
    before = query(index, vectors[3].raw[0])
    index = reopen()
    assert index.stats()[0].whitening_version == 1
    assert query(index, vectors[3].raw[0]) == before


def test_compact_space_keeps_int8_raw_vectors_and_learns_its_reduction(index) -> None:
    vectors = [add(index, f"img{i}", i, n=2, recipe="compact") for i in range(4)]
    assert index.space("compact", "region").dim == DIM and due(index, "compact", "region")  # 8 = compact_after
    raw = index.raw_vectors("compact", "region")
    expected = np.concatenate([v.raw for v in vectors])
    assert raw.shape == expected.shape and np.abs(raw - expected).max() < 0.02 * np.abs(expected).max()
    index.learn_whitening("compact", "region")
    assert index.space("compact", "region").dim == 4
    assert query(index, vectors[2].raw[1], recipe="compact")[0][0] == "img2"
    assert not due(index, "compact", "region")
    for i in range(4, 8):
        add(index, f"img{i}", i, n=2, recipe="compact")
    assert due(index, "compact", "region")  # doubled


def keyframes(video: str, frames: list[int]) -> list[NewKeyframe]:
    return [
        NewKeyframe(f"{video}#{f}", f, f / 25, f // 50, 320, 240, [regions(1000 + f, n=2)], thumbnail=b"kf")
        for f in frames
    ]


def test_videos_replace_append_resume_and_delete(index) -> None:
    add(index, "photo", 1)
    assert index.replace_video("clip", keyframes("clip", [0, 50]), source="/v/clip.mp4", metadata={"c": "1"}) == 0
    assert index.replace_video("clip", keyframes("clip", [0, 25, 75]), source="/v/clip.mp4") == 2
    assert index.count_videos() == (1, 3)
    assert (index.id_holder("clip"), index.id_holder("photo"), index.id_holder("x")) == ("video", "image", None)
    hit = query(index, keyframes("clip", [25])[0].vectors[0].raw[1])[0]
    assert hit[0] == "clip#25"
    with pytest.raises(DuplicateId, match="a video is indexed under this id"):
        add(index, "clip", 5)
    with pytest.raises(DuplicateId, match="an image is indexed under this id"):
        index.replace_video("photo", keyframes("photo", [0]))

    assert index.live_resume("cam") is None
    added = index.append_keyframes("cam", keyframes("cam", [0, 50]), live=True, source="rtsp://cam")
    assert [kf.external_id for kf in added] == ["cam#0", "cam#50"]
    again = index.append_keyframes("cam", keyframes("cam", [50, 100]), live=True)  # resent after a break
    assert [kf.external_id for kf in again] == ["cam#100"]
    resume = index.live_resume("cam")
    assert (resume.keyframes, resume.last_time_s, resume.last_shot) == (3, 4.0, 2)
    with pytest.raises(DuplicateId, match="a live stream is indexed under this id"):
        index.append_keyframes("cam", keyframes("cam", [150]), live=False)
    rows = {r.external_id: r for r in index.images(_all_image_ids(index)).values()}
    assert (rows["cam#50"].video_id, rows["cam#50"].frame, rows["cam#50"].source) == ("cam", 50, "rtsp://cam")
    assert index.delete(["clip", "cam#0"]) == (2, [])
    assert index.count_videos() == (1, 2)
    assert index.id_holder("clip") is None and not index.contains("clip#25")


def test_learned_models_are_versioned(index) -> None:
    assert index.learned("vlad", "codebook") is None
    assert index.save_learned("vlad", "codebook", np.arange(6, dtype=np.float32).reshape(2, 3), "first") == 1
    big = np.random.default_rng(0).normal(size=(256, 320)).astype(np.float32)  # chunked in the Milvus store
    assert index.save_learned("vlad", "codebook", big, "second") == 2
    version, data, source = index.learned("vlad", "codebook")
    assert (version, source) == (2, "second") and np.array_equal(data, big)
