"""`pip install .` and `pip install -e .` both give importable packages and generated stubs, from anywhere; the
`gpu` and `cpu` extras and the base install give each platform the runtimes it can use."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the test extra's tomli
    import tomli as tomllib

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


# what each platform reports to environment markers (PEP 508): a Jetson and other aarch64 Linux machines, a Mac
# with Apple silicon (arm64, not aarch64), an x86_64 Linux server and 64-bit Windows
PLATFORMS = {
    "linux-x86_64": {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64"},
    "linux-aarch64": {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "aarch64"},
    "darwin-arm64": {"sys_platform": "darwin", "platform_system": "Darwin", "platform_machine": "arm64"},
    "win-amd64": {"sys_platform": "win32", "platform_system": "Windows", "platform_machine": "AMD64"},
}
RUNTIMES = {"onnxruntime", "onnxruntime-gpu", "tensorrt"}


def project() -> dict:
    """pyproject.toml's [project] table: what pip reads, whether or not this checkout was installed since."""
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def installed(platform: str, extras: tuple[str, ...] = ()) -> dict[str, Requirement]:
    """The requirements pip installs on `platform` for `pip install 'inserve[extras]'`, by name."""
    table = project()
    chosen = {}
    for extra, texts in [("", table["dependencies"])] + [(e, table["optional-dependencies"][e]) for e in extras]:
        for requirement in map(Requirement, texts):
            if requirement.marker is None or requirement.marker.evaluate(PLATFORMS[platform] | {"extra": extra}):
                chosen[requirement.name] = requirement
    return chosen


@pytest.mark.parametrize(
    ("platform", "extras", "runtimes"),
    [
        ("linux-x86_64", (), {"onnxruntime"}),
        ("linux-x86_64", ("gpu",), {"onnxruntime", "onnxruntime-gpu", "tensorrt"}),  # README: then remove onnxruntime
        ("linux-aarch64", (), set()),  # a Jetson: onnxruntime-gpu and TensorRT come with JetPack, pip must not clobber
        ("linux-aarch64", ("gpu",), set()),
        ("linux-aarch64", ("cpu",), {"onnxruntime"}),  # an aarch64 Linux machine that is not a Jetson
        ("darwin-arm64", (), {"onnxruntime"}),
        ("darwin-arm64", ("gpu",), {"onnxruntime"}),
        ("win-amd64", (), {"onnxruntime"}),
        ("win-amd64", ("gpu",), {"onnxruntime"}),  # the gpu extra serves x86_64 Linux servers and Jetsons only
    ],
)
def test_each_platform_gets_the_runtimes_it_can_use(platform: str, extras: tuple[str, ...], runtimes: set[str]) -> None:
    assert set(installed(platform, extras)) & RUNTIMES == runtimes


@pytest.mark.parametrize("platform", ["linux-x86_64", "linux-aarch64"])
def test_the_gpu_extra_brings_cuda_python_12_and_onnx_everywhere(platform: str) -> None:
    """cuda-python 13 needs a CUDA 13 driver; JetPack 6 has CUDA 12."""
    chosen = installed(platform, ("gpu",))
    assert {"cuda-python", "onnx"} <= set(chosen)
    assert chosen["cuda-python"].specifier.contains("12.9.0") and not chosen["cuda-python"].specifier.contains("13.0.0")


def test_the_cpu_extra_asks_for_the_onnxruntime_the_base_install_does() -> None:
    """One onnxruntime requirement, whichever way it is installed."""
    base, cpu = installed("linux-x86_64")["onnxruntime"], installed("linux-aarch64", ("cpu",))["onnxruntime"]
    assert base.specifier == cpu.specifier
