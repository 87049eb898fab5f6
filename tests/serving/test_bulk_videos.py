"""Bulk indexing of videos on a real local Ray (2 CPUs), into a Milvus store (a milvus-lite file): the same
keyframes and vectors as IndexVideo's, a video that does not decode reported, and a rerun that skips what is
stored."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from media import scenes_video
from photos import encode, photo

from inserve.server.bulk_index import bulk_index
from inserve.server.config import IndexConfig, ServerConfig
from inserve.server.index import open_index
from inserve.server.instance_search import InstanceSearch
from inserve.server.video.indexer import index_video
from inserve.server.video.keyframes import SelectionRules

ray = pytest.importorskip("ray")

RECIPES = ("gem",)


def keyframe_vectors(index, video_id: str) -> dict[str, np.ndarray]:
    """Each keyframe's gem vector in its space's coordinates, by keyframe id."""
    found = index.nearest("gem", "global", index.transform("gem", "global", np.ones(1280)), 100)
    rows = index.images([row.image_id for row, _ in found])
    ids = {row.image_id: rows[row.image_id].external_id for row, _ in found if rows[row.image_id].video_id == video_id}
    vectors = index.image_vectors("gem", "global", sorted(ids))
    return {ids[image_id]: vecs[0] for image_id, (_, vecs) in vectors.items()}


def test_bulk_index_stores_the_keyframes_indexvideo_stores(models_dir: Path, tmp_path: Path) -> None:
    media = tmp_path / "media"
    media.mkdir()
    scenes_video(media / "first.mp4", [photo("astronaut"), photo("coffee")], seconds_each=1)
    scenes_video(media / "second.mp4", [photo("chelsea"), photo("rocket"), photo("camera")], seconds_each=1)
    (media / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not a video")
    (media / "photo.jpg").write_bytes(encode(photo("coins")))
    files = [(p.name, p) for p in sorted(media.iterdir())]
    config = ServerConfig(
        data_dir=tmp_path / "unused", store=str(tmp_path / "milvus.db"), models=models_dir, recipes=RECIPES
    )
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        result = bulk_index(config, files, workers=2)
        assert (result.indexed, result.skipped, list(result.failed)) == (3, 0, ["broken.mp4"])
        again = bulk_index(config, files)
        assert (again.indexed, again.skipped, list(again.failed)) == (0, 3, ["broken.mp4"])
    finally:
        ray.shutdown()

    # the vectors as stored: read back at full precision on both sides (the directory's scoring table would
    # otherwise give them in float16, Milvus in float32)
    exact = IndexConfig(scoring_precision="float32")
    service = InstanceSearch(
        ServerConfig(data_dir=tmp_path / "service", models=models_dir, recipes=RECIPES, index=exact)
    )
    try:
        rules = SelectionRules.defaults(service.config.video)
        expected = {}
        for name in ("first.mp4", "second.mp4"):
            with open(media / name, "rb") as file:
                index_video(service, name, file, rules)
            expected[name] = keyframe_vectors(service.index, name)
    finally:
        service.close()
    index = open_index(config.data_dir, config.store, config.index, {})
    try:
        assert index.count_videos() == (2, sum(len(v) for v in expected.values()))
        assert index.count_images() == 1 + index.count_videos()[1]
        for name, vectors in expected.items():
            assert len(vectors) >= 2
            stored = keyframe_vectors(index, name)
            assert sorted(stored) == sorted(vectors)
            for keyframe, vector in vectors.items():
                np.testing.assert_allclose(stored[keyframe], vector, atol=1e-5)
        found = index.nearest("gem", "global", index.transform("gem", "global", np.ones(1280)), 100)
        sources = {row.video_id: row.source for row in index.images([r.image_id for r, _ in found]).values()}
        assert sources == {None: "", "first.mp4": str(media / "first.mp4"), "second.mp4": str(media / "second.mp4")}
    finally:
        index.close()
