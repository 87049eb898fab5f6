"""The CLI against a real server: index a folder, search with a box and draw the result, stats, delete."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from photos import encode, photo
from PIL import Image
from servers import running_server

from inserve.engines.cuda_runtime import MISSING_GPU_PACKAGES
from inserve.engines.devices import visible_gpus
from inserve.engines.onnxruntime_engine import INSTALL_ONNXRUNTIME
from inserve.engines.tensorrt_engine import NO_GPU

NAMES = ("astronaut", "chelsea", "coffee", "rocket")


def inserve(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "inserve.clients.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def server(models_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    with running_server(models_dir, tmp_path_factory.mktemp("data"), "--recipe", "dasr_star,gem") as running:
        yield running


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for name in NAMES:
        (folder / f"{name}.jpg").write_bytes(encode(photo(name)))
    (folder / "notes.txt").write_text("not an image")
    return folder


@pytest.fixture(scope="module")
def indexed(server, photo_dir: Path) -> subprocess.CompletedProcess:
    return inserve("index", "--server", server.address, "--quiet", str(photo_dir))


def test_index_takes_the_images_of_a_folder(indexed: subprocess.CompletedProcess) -> None:
    assert indexed.returncode == 0, indexed.stderr
    assert f"indexed {len(NAMES)} images" in indexed.stdout


def test_search_prints_ranked_hits_and_draws_them(server, photo_dir: Path, indexed, tmp_path: Path) -> None:
    out = tmp_path / "result.png"
    query = photo_dir / "chelsea.jpg"
    found = inserve("search", "--server", server.address, str(query), "--box", "100,30,330,290", "--top-k", "3")
    assert found.returncode == 0, found.stderr
    lines = found.stdout.splitlines()
    assert len(lines) == 3 and lines[0].split()[:1] == ["1"] and "chelsea.jpg" in lines[0]
    shown = inserve("search", "--server", server.address, str(query), "--box", "100,30,330,290", "--show", str(out))
    assert shown.returncode == 0, shown.stderr
    picture = Image.open(out)
    assert picture.format == "PNG" and picture.width > 451


def test_stats_and_delete(server, indexed) -> None:
    stats = inserve("stats", "--server", server.address)
    assert stats.returncode == 0 and f"images {len(NAMES)}" in stats.stdout and "dasr_star/region" in stats.stdout
    deleted = inserve("delete", "--server", server.address, "rocket.jpg", "nothing.jpg")
    assert deleted.returncode == 0 and "deleted 1; not indexed: nothing.jpg" in deleted.stdout


def test_errors_are_one_line_and_a_nonzero_exit(server, indexed, photo_dir: Path) -> None:
    bad = inserve("search", "--server", server.address, str(photo_dir / "notes.txt"))
    assert bad.returncode != 0 and "INVALID_ARGUMENT" in bad.stderr and "Traceback" not in bad.stderr


def test_a_query_that_is_not_a_file_or_a_negative_top_k_is_refused_without_a_traceback(server, tmp_path: Path) -> None:
    folder = inserve("search", "--server", server.address, str(tmp_path))
    assert folder.returncode == 2 and "Traceback" not in folder.stderr and folder.stderr.count("\n") == 1
    assert f"{tmp_path}: Is a directory" in folder.stderr
    negative = inserve("search", "--server", server.address, str(tmp_path), "--top-k", "-5")
    assert negative.returncode == 2 and "Traceback" not in negative.stderr
    assert "--top-k takes a count of hits, at least 1, got -5" in negative.stderr


def test_missing_models_are_one_line_naming_the_export_command(tmp_path: Path) -> None:
    (tmp_path / "gnd.json").write_text('{"images": [], "queries": []}')
    done = inserve("eval", str(tmp_path), "--models", str(tmp_path / "nowhere"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "run `inserve export --backbone efficientnet_lite0" in done.stderr


def test_a_missing_dataset_is_one_line(tmp_path: Path) -> None:
    done = inserve("eval", str(tmp_path / "no-dataset"))
    assert done.returncode == 2 and "Traceback" not in done.stderr and "gnd.json" in done.stderr


BAD_SETTINGS = [
    (("--recipe", "gem,nope"), "unknown recipe(s) nope; choose from mac, spoc, gem, rmac"),
    (("--region-set-weight", "1.5"), "region_set_weight must be between 0 and 1, got 1.5"),
    (("--whole-weight", "-0.1"), "whole_weight must be between 0 and 1, got -0.1"),
    (("--query-low-side", "-5"), "query_low_side must be >= 0 (0 = off), got -5"),
    (("--sigmas", "0"), "sigmas must be positive"),
    (("--queue-depth", "4"), "queue_depth 4 is below max_batch 8: need max_batch <= queue_depth"),
    (("--precision", "int8"), "precision int8 needs a calibration folder of images"),
    (("--dla-core", "-1"), "dla_core must be >= 0, got -1"),
    (("--store", "milvus://nohost"), "--store milvus://nohost: give milvus://HOST:PORT"),
    (("--store", "http://h:19530"), "the only URL scheme is milvus://; give milvus://HOST:PORT (a shared Milvus)"),
    (("--store", ""), "--store is empty: give milvus://HOST:PORT"),
    (("--store", "x.txt"), "--store x.txt names a file that is not a milvus-lite *.db"),
    (("--port", "70000"), "port 70000 is outside 0-65535 (0 picks a free one)"),
]


@pytest.mark.parametrize(
    ("flags", "message"),
    BAD_SETTINGS,
    ids=[
        "recipe",
        "region-set-weight",
        "whole-weight",
        "query-low-side",
        "sigmas",
        "queue-depth",
        "int8-without-images",
        "dla-core",
        "store",
        "store-http",
        "store-empty",
        "store-txt",
        "port",
    ],
)
def test_bad_settings_are_one_line_saying_what_is_valid_before_any_model_loads(tmp_path: Path, flags, message) -> None:
    done = inserve("serve", *flags, "--models", str(tmp_path / "nowhere"), "--data-dir", str(tmp_path / "data"))
    assert done.returncode == 2 and "Traceback" not in done.stderr and done.stderr.count("\n") == 1
    assert message in done.stderr


def test_a_data_directory_that_cannot_hold_an_index_is_one_line_before_any_model_loads(tmp_path: Path) -> None:
    file = tmp_path / "file"
    file.write_text("x")
    for data_dir, message in ((file, "is a file, not a directory"), ("/sys/x", "cannot create data directory /sys/x")):
        done = inserve("serve", "--models", str(tmp_path / "nowhere"), "--data-dir", str(data_dir))
        assert done.returncode == 2 and "Traceback" not in done.stderr and done.stderr.count("\n") == 1
        assert message in done.stderr


def test_build_engines_says_what_it_needs_in_one_line(models_dir: Path, tmp_path: Path) -> None:
    cache = ("--engine-cache", str(tmp_path / "engines"), "--models", str(models_dir))
    done = inserve("build-engines", "--device", "cpu", *cache)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "build-engines needs --device tensorrt or tensorrt-native and --engine-cache DIR" in done.stderr
    if importlib.util.find_spec("tensorrt") is None:  # where it is installed, the build is tested on the GPU
        done = inserve("build-engines", "--device", "tensorrt-native", *cache)
        assert done.returncode == 2 and "Traceback" not in done.stderr and done.stderr.count("\n") == 1
        assert "needs the tensorrt and cuda-python packages" in done.stderr


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


def junk_plan_refusal() -> str:
    """What refuses a file that is not a plan on this machine: the missing packages, the missing GPU, or the
    TensorRT that cannot load it."""
    if not installed("tensorrt") or not (installed("cuda.bindings") or installed("cuda.cudart")):
        return MISSING_GPU_PACKAGES
    return NO_GPU if visible_gpus() == 0 else "built by another TensorRT version or for another GPU"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("backbone.onnx", "--import-plan takes GRAPH.onnx=PLAN, got 'backbone.onnx'"),
        ("nosuch.onnx={junk}", "no graph 'nosuch.onnx' in "),
        ("backbone.onnx={missing}", "No such file or directory"),
        ("backbone.onnx={junk}", None),
    ],
    ids=["no-plan", "unknown-graph", "missing-file", "not-a-plan"],
)
def test_import_plan_refusals_are_one_line(models_dir: Path, tmp_path: Path, spec: str, message: str | None) -> None:
    junk, missing = tmp_path / "junk.plan", tmp_path / "missing.plan"
    junk.write_bytes(os.urandom(4096))
    cache = tmp_path / "engines"
    flags = ("--device", "tensorrt-native", "--engine-cache", str(cache), "--models", str(models_dir))
    done = inserve("build-engines", *flags, "--import-plan", spec.format(junk=junk, missing=missing))
    assert done.returncode == 2 and "Traceback" not in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert (message or junk_plan_refusal()) in done.stderr
    assert not list(cache.glob("*.plan"))  # nothing imported, nothing built


def test_serving_without_onnxruntime_is_one_line_saying_what_to_install(models_dir: Path, tmp_path: Path) -> None:
    """Linux aarch64 installs leave onnxruntime out (pyproject.toml): serve stops with one line naming the fix."""
    hidden = "import sys; sys.modules['onnxruntime'] = None; from inserve.clients.cli import main; sys.exit(main())"
    flags = ("serve", "--models", str(models_dir), "--data-dir", str(tmp_path / "data"), "--port", "0")
    done = subprocess.run([sys.executable, "-c", hidden, *flags], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr and done.stderr.count("\n") == 1
    assert "onnxruntime cannot be imported" in done.stderr and INSTALL_ONNXRUNTIME in done.stderr


def test_options_a_recipe_cannot_take_are_refused_before_indexing(models_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "gnd.json").write_text('{"images": [], "queries": []}')
    args = ("eval", str(tmp_path), "--models", str(models_dir), "--recipe", "whole_and_regions", "--qe", "2")
    done = inserve(*args)
    assert done.returncode == 2 and "Traceback" not in done.stderr and done.stderr.count("\n") == 1
    assert "whole_and_regions scores every candidate by all its regions: it takes no query_expansion" in done.stderr
