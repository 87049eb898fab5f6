"""The CLI's serving side without a server: flags over the config defaults, and how video hits print."""

from __future__ import annotations

from pathlib import Path

from inserve.clients.cli import build_parser
from inserve.clients.cli_flags import server_config
from inserve.clients.remote_commands import hit_line
from inserve.clients.render import timecode
from inserve.server.config import BatcherConfig, ServerConfig, VideoConfig
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
