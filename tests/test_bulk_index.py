"""Bulk indexing on a real local Ray (2 CPUs, two describing workers): the same vectors as the service's own
indexing, images that do not decode reported and skipped, and a rerun that indexes only what is missing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from photos import PHOTOS, encode, photo

from inserve.clients.cli import main as cli
from inserve.server.bulk_index import bulk_index
from inserve.server.config import ServerConfig
from inserve.server.index import InstanceIndex
from inserve.server.instance_search import InstanceSearch

ray = pytest.importorskip("ray")

RECIPES = ("gem",)


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    for name in PHOTOS[:6]:
        (root / f"{name}.jpg").write_bytes(encode(photo(name)))
    (root / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return root


def files(folder: Path, names: list[str] | None = None) -> list[tuple[str, Path]]:
    found = sorted((p.name, p) for p in folder.iterdir())
    return [(n, p) for n, p in found if names is None or n in names]


def global_vectors(index: InstanceIndex) -> dict[str, np.ndarray]:
    """Each image's raw gem vector, by its id."""
    _, image_ids, raw = index.store.space_vectors("gem", "global")
    rows = index.images([int(i) for i in image_ids])
    return {rows[int(i)].external_id: vector for i, vector in zip(image_ids, raw)}


def test_bulk_index_stores_what_the_service_stores(
    local_ray: None, folder: Path, models_dir: Path, tmp_path: Path
) -> None:
    config = ServerConfig(data_dir=tmp_path / "bulk", models=models_dir, recipes=RECIPES)
    result = bulk_index(config, files(folder), workers=2)
    assert result.indexed == 6 and result.skipped == 0
    assert list(result.failed) == ["broken.jpg"] and "image" in result.failed["broken.jpg"]

    service = InstanceSearch(ServerConfig(data_dir=tmp_path / "service", models=models_dir, recipes=RECIPES))
    try:
        for name, path in files(folder):
            if name != "broken.jpg":
                service.index_image(name, path.read_bytes())
        expected = global_vectors(service.index)
    finally:
        service.close()
    index = InstanceIndex(config.data_dir)
    try:
        stored = global_vectors(index)
        assert sorted(stored) == sorted(expected) == sorted(f"{n}.jpg" for n in PHOTOS[:6])
        for name, vector in expected.items():
            np.testing.assert_allclose(stored[name], vector, rtol=1e-4, atol=1e-5)
        assert index.store.thumbnails([1])[1][:2] == b"\xff\xd8"  # the thumbnail came along
    finally:
        index.close()


def test_a_rerun_indexes_only_what_is_missing(local_ray: None, folder: Path, models_dir: Path, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    config = ServerConfig(data_dir=data_dir, models=models_dir, recipes=RECIPES)
    first = bulk_index(config, files(folder, ["astronaut.jpg", "chelsea.jpg", "coffee.jpg"]))
    assert (first.indexed, first.skipped, first.failed) == (3, 0, {})
    flags = ["--data-dir", str(data_dir), "--models", str(models_dir), "--recipe", "gem", "--workers", "2"]
    assert cli(["bulk-index", str(folder), *flags, "--quiet"]) == 1  # the broken file is reported
    again = bulk_index(config, files(folder) + files(folder, ["camera.jpg"]))  # an id given twice counts once
    assert (again.indexed, again.skipped, list(again.failed)) == (0, 7, ["broken.jpg"])
    index = InstanceIndex(data_dir)
    try:
        assert index.count_images() == 6
        assert len(global_vectors(index)) == 6  # each once
    finally:
        index.close()


def test_files_the_api_would_refuse_or_that_point_nowhere_are_listed_not_indexed(
    models_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """An id with '#' could never be replaced through IndexImages; a dangling symlink has nothing to read. Both
    are named in the failure list (exit code 1), before any worker starts."""
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "odd #1.jpg").write_bytes(encode(photo("chelsea")))
    (folder / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    flags = ["--data-dir", str(tmp_path / "data"), "--models", str(models_dir), "--recipe", "gem", "--quiet"]
    assert cli(["bulk-index", str(folder), *flags]) == 1
    out, err = capsys.readouterr()
    assert "indexed 0 images and videos, 0 stored already, 2 failed" in out
    assert "odd #1.jpg: not indexed: id 'odd #1.jpg' (from the file name) contains '#'" in err
    assert "gone.jpg: not indexed:" in err and "is not a file (a dangling symlink?)" in err
    index = InstanceIndex(tmp_path / "data")
    try:
        assert index.count_images() == 0
    finally:
        index.close()
