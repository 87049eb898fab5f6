"""The CLI's serving side without a server: flags over the config defaults, and how video hits print."""

from __future__ import annotations

from pathlib import Path

import pytest

from inserve.clients.cli import build_parser
from inserve.clients.cli_flags import server_config
from inserve.clients.remote_commands import hit_line
from inserve.clients.render import timecode
from inserve.engines import EngineOptions
from inserve.server.config import BatcherConfig, DasrConfig, ServerConfig, VideoConfig
from inserve.server.instance_search import serving_shapes
from inserve.server.models import ServingShapes
from inserve.v1 import inserve_pb2 as pb


def serve_config(*flags: str):
    args = build_parser().parse_args(["serve", *flags])
    return server_config(args, ("gem",), Path("data"))


def test_flags_left_out_are_the_config_defaults() -> None:
    """Defaults live in server/config.py (and EngineOptions) only: no flag repeats one."""
    assert serve_config() == ServerConfig(data_dir=Path("data"), recipes=("gem",))
    args = build_parser().parse_args(["eval", "dataset"])
    assert server_config(args, (args.recipe,), Path("x")) == ServerConfig(data_dir=Path("x"))


def test_serve_takes_its_defaults_from_the_config_and_flags_override_them() -> None:
    assert serve_config().batcher == BatcherConfig()
    assert serve_config().video == VideoConfig()
    assert not serve_config("--no-cpu-arena").engine.cpu_arena
    config = serve_config("--max-batch", "1", "--queue-depth", "4", "--buckets", "1:1", "--media-root", "/srv/v")
    assert (config.batcher.max_batch, config.batcher.queue_depth, config.batcher.buckets) == (1, 4, ("1:1",))
    assert config.batcher.max_delay_ms == BatcherConfig().max_delay_ms
    assert config.video.media_root == Path("/srv/v") and config.video.max_concurrent == VideoConfig().max_concurrent


def config_of(*argv: str) -> ServerConfig:
    return server_config(build_parser().parse_args(list(argv)), ("gem",), Path("data"))


TENSORRT_FLAGS = ("--device", "tensorrt-native", "--engine-cache", "/var/cache/inserve", "--workspace-mb", "512")


@pytest.mark.parametrize("command", [("serve",), ("build-engines",), ("eval", "dataset")], ids=lambda c: c[0])
def test_the_tensorrt_flags_reach_the_engine_options(command: tuple[str, ...]) -> None:
    engine = config_of(*command, *TENSORRT_FLAGS, "--precision", "fp16", "--dla-core", "0").engine
    expected = {"cache_dir": Path("/var/cache/inserve"), "workspace_bytes": 512 << 20, "precision": "fp16"}
    assert engine == EngineOptions(device="tensorrt-native", dla_core=0, **expected)
    left_out = config_of(*command).engine
    assert (left_out.cache_dir, left_out.workspace_bytes) == (None, EngineOptions().workspace_bytes)


def test_build_engines_builds_for_the_shapes_serve_feeds() -> None:
    """Plans are keyed by their profiles, which follow the batcher: serve with the same flags builds nothing."""
    flags = (*TENSORRT_FLAGS, "--max-batch", "2", "--queue-depth", "4", "--buckets", "1:1", "--long-side", "128")
    serve, build = config_of("serve", *flags), config_of("build-engines", *flags)
    assert serving_shapes(build) == serving_shapes(serve) == ServingShapes(("1:1",), 128, 2, DasrConfig().seeds_per_run)
    assert build.engine == serve.engine


def test_time_codes() -> None:
    assert timecode(83.4) == "00:01:23.400"
    assert timecode(3 * 3600 + 5.0004) == "03:00:05.000"
    assert timecode(-1.0) == "00:00:00.000"


def test_a_keyframe_hit_prints_as_video_at_time_code_with_its_box() -> None:
    hit = pb.SearchHit(rank=2, id="news#2085", score=0.8123, source="news.mp4")
    hit.box.CopyFrom(pb.Box(x1=10, y1=20, x2=110, y2=220))
    hit.keyframe.CopyFrom(pb.Keyframe(video_id="news.mp4", frame=2085, time_s=83.4, shot=7))
    line = hit_line(hit)
    assert "news.mp4 @ 00:01:23.400" in line and "frame 2085" in line and "shot 7" in line
    assert "[10,20,110,220]" in line
    photo = pb.SearchHit(rank=1, id="cat.jpg", score=0.9)
    assert "cat.jpg" in hit_line(photo) and "@" not in hit_line(photo)
