"""Server-side video paths stay under the media root, whatever `..` and symlinks say."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from inserve.server.video.media import MediaAccessDenied, open_media


@pytest.fixture
def root(tmp_path: Path) -> Path:
    media = tmp_path / "media"
    (media / "news").mkdir(parents=True)
    (media / "news" / "clip.mp4").write_bytes(b"inside")
    (tmp_path / "secret.mp4").write_bytes(b"outside")
    return media


@pytest.mark.parametrize("name", ["news/clip.mp4", "./news/../news/clip.mp4"])
def test_files_under_the_root_open(root: Path, name: str) -> None:
    with open_media(root, name) as f:
        assert f.read() == b"inside"


def test_absolute_paths_under_the_root_open(root: Path) -> None:
    with open_media(root, str(root / "news" / "clip.mp4")) as f:
        assert f.read() == b"inside"


@pytest.mark.parametrize("name", ["../secret.mp4", "news/../../secret.mp4", "/etc/passwd"])
def test_paths_leading_out_are_refused(root: Path, name: str) -> None:
    with pytest.raises(MediaAccessDenied, match="outside the media root"):
        open_media(root, name)


def test_symlinks_leading_out_are_refused(root: Path) -> None:
    os.symlink(root.parent / "secret.mp4", root / "link.mp4")
    os.symlink(root.parent, root / "up")
    for name in ("link.mp4", "up/secret.mp4"):
        with pytest.raises(MediaAccessDenied):
            open_media(root, name)


def test_a_root_that_is_a_symlink_still_serves_its_files(root: Path) -> None:
    alias = root.parent / "alias"
    os.symlink(root, alias)
    with open_media(alias, "news/clip.mp4") as f:
        assert f.read() == b"inside"


def test_no_root_refuses_and_missing_files_are_not_found(root: Path) -> None:
    with pytest.raises(MediaAccessDenied, match="no media root"):
        open_media(None, "news/clip.mp4")
    with pytest.raises(FileNotFoundError):
        open_media(root, "news/missing.mp4")
