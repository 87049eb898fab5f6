"""`pip install .` and `pip install -e .` both give importable packages and generated stubs, from anywhere; the
`gpu` extra installs where pip can serve it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
IMPORTS = (
    "import inserve.v1.inserve_pb2 as pb, inserve.v1.inserve_pb2_grpc, inserve.server.grpc.app, inserve.engines, "
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


@pytest.mark.parametrize(
    ("machine", "expected"),
    [
        ("x86_64", {"onnxruntime-gpu", "tensorrt", "cuda-python", "onnx"}),
        ("aarch64", {"cuda-python", "onnx"}),  # a Jetson: TensorRT and onnxruntime-gpu come with JetPack
    ],
)
def test_the_gpu_extra_installs_on_x86_gpu_servers_and_on_jetsons(machine: str, expected: set[str]) -> None:
    requirements = [Requirement(text) for text in metadata.requires("inserve") or []]
    environment = {"platform_machine": machine, "extra": "gpu"}
    wanted = {r.name for r in requirements if r.marker is not None and "gpu" in str(r.marker)}
    assert {r.name for r in requirements if r.name in wanted and r.marker.evaluate(environment)} == expected
