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
    """Installs a copy of the tracked files (a clean checkout), so the build leaves the repo untouched."""
    checkout, target = tmp_path / "checkout", tmp_path / "site"
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    for name in tracked.splitlines():
        if (REPO / name).is_file():
            (checkout / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, checkout / name)
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation"]
    subprocess.run([*pip, "--target", target, "."], cwd=checkout, check=True, timeout=600, capture_output=True)
    assert (target / "inserve" / "v1" / "inserve_pb2_grpc.py").is_file()
    assert imported_from(tmp_path, f"PYTHONPATH={target}").is_relative_to(target)
