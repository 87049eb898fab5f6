"""`pip install .` and `pip install -e .` both give importable packages and generated stubs, from anywhere."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMPORTS = (
    "import inserve.v1.inserve_pb2 as pb, inserve.v1.inserve_pb2_grpc, inserve.server.app, inserve.engines, "
    "inserve.clients.cli, inserve.export.programs; print(pb.__file__)"
)


def imported_from(cwd: Path, *env: str) -> Path:
    command = ["env", *env, sys.executable, "-c", IMPORTS]
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120, check=True)
    return Path(done.stdout.strip())


def test_the_editable_install_imports_from_outside_the_repo(tmp_path: Path) -> None:
    assert imported_from(tmp_path).is_relative_to(REPO)


def test_a_regular_install_builds_the_stubs_into_the_installed_package(tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            target,
            ".",
        ],
        cwd=REPO,
        check=True,
        timeout=600,
        capture_output=True,
    )
    assert (
        not list((target / "inserve" / "v1").glob("*.proto"))
        or (target / "inserve" / "v1" / "inserve_pb2.py").is_file()
    )
    assert imported_from(tmp_path, f"PYTHONPATH={target}").is_relative_to(target)
