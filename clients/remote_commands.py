"""The commands that call a server: index, index-video, ingest, search, stats, delete."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from inserve.clients.cli_flags import add_connection_flags, channel_security
from inserve.engines.precision import IMAGE_SUFFIXES
from inserve.server.config import OVERLOADS
from inserve.server.grouping import GROUPINGS

if TYPE_CHECKING:
    from inserve.clients.client import InstanceSearchClient

DEFAULT_SERVER = "localhost:50051"


def _box(text: str) -> tuple[float, float, float, float]:
    values = [float(v) for v in text.split(",")]
    if len(values) != 4:
        raise argparse.ArgumentTypeError(f"a box is x1,y1,x2,y2, got {text!r}")
    return tuple(values)


def _top_k(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"--top-k takes a count of hits, at least 1, got {value}")
    return value


def connect(args: argparse.Namespace) -> InstanceSearchClient:
    """The client a client command's flags (--server, --timeout, TLS and token) describe."""
    from inserve.clients.client import InstanceSearchClient

    deadlines = {} if args.timeout is None else {"timeout": args.timeout, "stream_timeout": args.timeout}
    return InstanceSearchClient(args.server, security=channel_security(args), **deadlines)


def image_files(
    paths: list[Path], suffixes: tuple[str, ...] = IMAGE_SUFFIXES, dangling: bool = False
) -> Iterator[tuple[str, Path]]:
    """(id, path) of every image (every file with one of `suffixes`) among files and folders (recursively); a
    folder's files are named by their path inside it. With `dangling`, symlinks to nothing are named too, so
    that a caller can list them as not indexed."""
    for path in paths:
        if path.is_dir():
            for file in sorted(path.rglob("*")):
                if file.suffix.lower() in suffixes and (file.is_file() or (dangling and file.is_symlink())):
                    yield str(file.relative_to(path)), file
        elif path.is_file():
            yield path.name, path
        else:
            raise FileNotFoundError(path)


def cmd_index(args: argparse.Namespace) -> int:
    import grpc
    from tqdm import tqdm

    from inserve.clients.client import ImageItem

    files = list(image_files(args.paths))
    items = (ImageItem.from_path(path, args.id_prefix + name, replace=args.replace) for name, path in files)
    regions = 0
    with connect(args) as client:
        try:
            for ack in tqdm(client.index_images(items), total=len(files), unit="img", disable=args.quiet):
                regions += len(ack.regions)
        except grpc.RpcError as exc:
            print(f"inserve index: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    print(f"indexed {len(files)} images, {regions} regions")
    return 0


def cmd_index_video(args: argparse.Namespace) -> int:
    import grpc
    from tqdm import tqdm

    from inserve.clients.client import VideoItem

    videos = [
        VideoItem(
            args.id_prefix + (Path(name).name if args.on_server else name.name),
            file=None if args.on_server else name,
            server_path=str(name) if args.on_server else "",
            scene_threshold=args.scene_threshold,
            min_interval_s=args.min_interval,
            max_interval_s=args.max_interval,
            iframes_only=args.iframes_only or None,
        )
        for name in args.files
    ]
    with connect(args) as client:
        for video in videos:
            with tqdm(desc=video.id, unit="frame", disable=args.quiet, file=sys.stderr) as bar:
                try:
                    for progress in client.index_video(video):
                        bar.update(progress.frames_decoded - bar.n)
                        bar.set_postfix(keyframes=progress.keyframes_indexed, regions=progress.regions, refresh=False)
                        last = progress
                except grpc.RpcError as exc:
                    print(f"inserve index-video: {video.id}: {exc.code().name}: {exc.details()}", file=sys.stderr)
                    return 1
            replaced = f", replaced {last.replaced} earlier keyframes" if last.replaced else ""
            print(
                f"{video.id}: {last.frames_decoded} frames ({last.duration_s:.1f} s), {last.shots} shots, "
                f"{last.keyframes_indexed} keyframes, {last.regions} regions{replaced}"
            )
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    import grpc
    from tqdm import tqdm

    from inserve.clients.client import LiveStreamSpec
    from inserve.clients.ingest import LiveIngest, source_frames

    stream = LiveStreamSpec(
        args.stream_id,
        source=args.url,
        overload=args.overload,
        scene_threshold=args.scene_threshold,
        min_interval_s=args.min_interval,
        max_interval_s=args.max_interval,
    )
    frames = source_frames(args.url, realtime=args.realtime, wall_clock=args.wall_clock, raw=args.raw)
    counts = {"keyframe": 0, "dropped": 0, "rejected": 0}
    latencies: list[float] = []
    with (
        connect(args) as client,
        tqdm(desc=args.stream_id, unit="keyframe", disable=args.quiet, file=sys.stderr) as bar,
    ):
        ingest = LiveIngest(client, stream, frames)
        try:
            for event in ingest.events():
                kind = event.WhichOneof("event")
                if kind == "opened" and event.opened.HasField("resume_after_s"):
                    bar.write(
                        f"{args.stream_id}: continuing after {event.opened.resume_after_s:.3f} s "
                        f"({event.opened.keyframes} keyframes stored)"
                    )
                elif kind == "keyframe":
                    counts[kind] += 1
                    latencies.append(event.keyframe.latency_s)
                    bar.update(1)
                    bar.set_postfix(
                        t=f"{event.keyframe.keyframe.time_s:.1f}s",
                        shot=event.keyframe.keyframe.shot,
                        searchable_after=f"{event.keyframe.latency_s:.2f}s",
                        refresh=False,
                    )
                elif kind == "dropped":
                    counts[kind] += event.dropped.frames
                elif kind == "rejected":
                    counts[kind] += 1
                    bar.write(f"frame at {event.rejected.time_s:.3f} s rejected: {event.rejected.error}")
        except grpc.RpcError as exc:
            print(f"inserve ingest: {args.stream_id}: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    median = sorted(latencies)[len(latencies) // 2] if latencies else 0.0
    print(
        f"{args.stream_id}: {counts['keyframe']} keyframes (searchable after {median:.2f} s, median), "
        f"{counts['dropped']} frames dropped, {counts['rejected']} rejected, {ingest.reconnections} reconnections"
    )
    return 0


def hit_line(hit) -> str:
    """One result line; keyframe hits show their video, time code, frame and shot."""
    from inserve.clients.render import timecode

    box = f"[{hit.box.x1:.0f},{hit.box.y1:.0f},{hit.box.x2:.0f},{hit.box.y2:.0f}]" if hit.HasField("box") else "-"
    if hit.region_source:
        box += f" ({hit.region_source})"
    if hit.HasField("keyframe"):
        kf = hit.keyframe
        where = f"{kf.video_id} @ {timecode(kf.time_s)}  frame {kf.frame}  shot {kf.shot}"
        return f"{hit.rank:4d}  {hit.score:.4f}  {where}  {box}  {hit.source}"
    return f"{hit.rank:4d}  {hit.score:.4f}  {hit.id}  {box}  {hit.source}"


def cmd_search(args: argparse.Namespace) -> int:
    import grpc

    data = args.image.read_bytes()
    with connect(args) as client:
        try:
            hits = client.search(
                data,
                args.box,
                args.top_k,
                args.recipe,
                args.qe,
                thumbnails=args.show is not None,
                rerank_top=args.rerank,
                group=args.group,
            )
        except grpc.RpcError as exc:
            print(f"inserve search: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    for hit in hits:
        print(hit_line(hit))
    if args.show is not None:
        show_results(args.image, data, args.box, hits, args.show)
        print(f"wrote {args.show}")
    return 0


def show_results(query_path: Path, data: bytes, box, hits, out: Path) -> None:
    from inserve.clients.render import HIT_COLOUR, QUERY_COLOUR, Tile, open_image, render_results, timecode

    query = open_image(data)
    tiles = [Tile(query, query.width, query.height, box, f"query\n{query_path.name}", QUERY_COLOUR)]
    for hit in hits:
        picture = open_image(hit.thumbnail, "" if hit.HasField("keyframe") else hit.source)
        hit_box = (hit.box.x1, hit.box.y1, hit.box.x2, hit.box.y2) if hit.HasField("box") else None
        name = f"{hit.keyframe.video_id} @ {timecode(hit.keyframe.time_s)}" if hit.HasField("keyframe") else hit.id
        caption = f"#{hit.rank}  score {hit.score:.3f}\n{name}"
        tiles.append(Tile(picture, hit.width, hit.height, hit_box, caption, HIT_COLOUR))
    render_results(tiles).save(out)


def cmd_stats(args: argparse.Namespace) -> int:
    with connect(args) as client:
        stats = client.stats()
    print(f"backbone {stats.backbone}, recipes {', '.join(stats.recipes)} (default {stats.default_recipe})")
    videos = f" ({stats.keyframes} of them keyframes of {stats.videos} videos)" if stats.videos else ""
    print(f"images {stats.images}{videos}, regions {stats.regions}")
    for s in stats.indexes:
        print(f"  {s.recipe}/{s.kind}: {s.vectors} vectors, {s.dim} dims, whitening v{s.whitening_version}")
    for name, reason in sorted(stats.unavailable.items()):
        print(f"  unavailable: {name}: {reason}")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    with connect(args) as client:
        response = client.delete(args.ids)
    print(f"deleted {response.deleted}" + (f"; not indexed: {', '.join(response.missing)}" if response.missing else ""))
    return 0


def add_remote_commands(sub: argparse._SubParsersAction) -> None:
    for name, fn, text in (
        ("index", cmd_index, "index image files and folders"),
        ("index-video", cmd_index_video, "index the keyframes of video files"),
        ("ingest", cmd_ingest, "stream a camera, RTSP, HTTP or file source live, keyframes searchable as they come"),
        ("search", cmd_search, "search with a query image"),
        ("stats", cmd_stats, "what the server holds"),
        ("delete", cmd_delete, "delete images by id"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--server", default=DEFAULT_SERVER)
        p.add_argument(
            "--timeout", type=float, default=None, help="deadline per call, seconds (default: 60 s, none for uploads)"
        )
        add_connection_flags(p)
        p.set_defaults(fn=fn)
        if name == "index":
            p.add_argument("paths", type=Path, nargs="+")
            p.add_argument("--replace", action="store_true", help="re-index ids that are already indexed")
            p.add_argument("--id-prefix", default="")
            p.add_argument("--quiet", action="store_true")
        elif name == "index-video":
            p.add_argument("files", type=Path, nargs="+", help="video files (ids = file names; re-indexing replaces)")
            p.add_argument("--on-server", action="store_true", help="the files are paths under the server's media root")
            p.add_argument("--id-prefix", default="")
            p.add_argument("--scene-threshold", type=float, default=None, help="shot cut: chi-square distance 0..1")
            p.add_argument("--min-interval", type=float, default=None, help="seconds between keyframes, at least")
            p.add_argument("--max-interval", type=float, default=None, help="seconds between keyframes, at most")
            p.add_argument("--iframes-only", action="store_true", help="keyframes among the codec's I-frames only")
            p.add_argument("--quiet", action="store_true")
        elif name == "ingest":
            p.add_argument("url", help="a file, http(s):// or rtsp:// URL, or a device PyAV can open")
            p.add_argument("--stream-id", required=True, help="the stream's id; the same id continues the stream")
            p.add_argument("--realtime", action="store_true", help="read a file at its frame rate, as a camera")
            p.add_argument("--wall-clock", action="store_true", help="stamp frames with the time they are read")
            p.add_argument("--raw", action="store_true", help="send rgb24 pixels instead of JPEG")
            p.add_argument("--overload", choices=OVERLOADS, default="wait", help="when the server is behind")
            p.add_argument("--scene-threshold", type=float, default=None, help="shot cut: chi-square distance 0..1")
            p.add_argument("--min-interval", type=float, default=None, help="seconds between keyframes, at least")
            p.add_argument("--max-interval", type=float, default=None, help="seconds between keyframes, at most")
            p.add_argument("--quiet", action="store_true")
        elif name == "search":
            p.add_argument("image", type=Path)
            p.add_argument("--box", type=_box, default=None, help="x1,y1,x2,y2 in the query's pixels")
            p.add_argument("--top-k", type=_top_k, default=10, help="hits to return, at least 1")
            p.add_argument("--recipe", default="")
            p.add_argument(
                "--qe", type=int, default=None, help="query expansion with the top M hits (default: recipe's)"
            )
            p.add_argument("--rerank", type=int, default=None, help="spatially re-rank the top N (default: recipe's)")
            p.add_argument("--show", type=Path, default=None, help="write the query and hits with boxes to this PNG")
            p.add_argument("--group", choices=GROUPINGS, default="none", help="one hit per video or per shot")
        elif name == "delete":
            p.add_argument("ids", nargs="+")
