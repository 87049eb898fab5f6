"""The `inserve` command: export models, serve, index, search, stats, delete, whiten, eval."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from inserve.clients.cli_flags import add_connection_flags, add_server_flags, apply_server_flags, channel_security
from inserve.engines.base import PRECISIONS
from inserve.server.config import (
    OVERLOADS,
    REGION_MODES,
    STAR_SEED_RULES,
    ConfigError,
    DasrConfig,
    RegionRecipeConfig,
    ServerConfig,
)
from inserve.server.grouping import GROUPINGS
from inserve.server.logs import FORMATS, configure_logging

if TYPE_CHECKING:
    from inserve.clients.client import InstanceSearchClient

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
DEFAULT_SERVER = "localhost:50051"
T = TypeVar("T")


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v)


def _box(text: str) -> tuple[float, float, float, float]:
    values = [float(v) for v in text.split(",")]
    if len(values) != 4:
        raise argparse.ArgumentTypeError(f"a box is x1,y1,x2,y2, got {text!r}")
    return tuple(values)


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", type=Path, default=Path("models"), help="where `inserve export` wrote (default: models)")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | tensorrt | tensorrt-native")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads per engine (0 = runtime default)")
    tensorrt = p.add_argument_group("TensorRT (--device tensorrt or tensorrt-native; profiles follow the buckets)")
    tensorrt.add_argument("--precision", default="fp32", choices=PRECISIONS, help="int8 needs --calibration")
    tensorrt.add_argument("--calibration", type=Path, default=None, help="folder of images to calibrate int8 on")
    tensorrt.add_argument("--engine-cache", type=Path, default=None, help="keep built engines and timing caches here")
    tensorrt.add_argument("--workspace-mb", type=int, default=None, help="builder workspace, MiB (default 2048)")
    tensorrt.add_argument("--dla-core", type=int, default=None, help="build for this DLA core (Jetson)")
    p.add_argument("--long-side", type=int, default=512, help="images are resized to this long side")
    p.add_argument("--stop-stride", type=int, default=None, help="DASR back-propagation stop stride")
    p.add_argument("--shape", default="moments", choices=["moments", "official"], help="DASR shape estimation")
    p.add_argument(
        "--dasr-mode", default=DasrConfig.mode, choices=REGION_MODES, help="DASR boxes: exact maps or adjoint moments"
    )
    p.add_argument("--sigmas", type=float, default=DasrConfig.sigmas, help="DASR adjoint boxes: standard deviations")
    p.add_argument("--star-seeds", default=DasrConfig.star_seeds, choices=STAR_SEED_RULES, help="DASR* seeds")
    p.add_argument(
        "--detector", type=Path, default=None, help="detector.onnx (or its export folder) for deepvision/deep_region"
    )
    p.add_argument("--cam-mode", default="offline", choices=["offline", "online"], help="cam: class aggregation")
    p.add_argument("--deep-region-source", default="detector", choices=["detector", "dasr_star"])
    p.add_argument("--deep-region-fusion", default="concat", choices=["concat", "mean", "max"])
    p.add_argument(
        "--region-set-weight",
        type=float,
        default=RegionRecipeConfig.region_set_weight,
        help="whole_and_regions: weight of the mean of the query regions' best matches (0..1)",
    )
    p.add_argument(
        "--box-temperature",
        type=float,
        default=RegionRecipeConfig.box_temperature,
        help="whole_and_regions: hits' boxes average the regions by softmax(similarity / this); 0 = best region",
    )


def engine_options(args: argparse.Namespace):
    """The EngineOptions the model flags describe (ConfigError when they cannot work together)."""
    from inserve.engines import EngineOptions

    workspace = {} if args.workspace_mb is None else {"workspace_bytes": args.workspace_mb << 20}
    try:
        return EngineOptions(
            device=args.device,
            intra_op_threads=args.threads,
            precision=args.precision,
            calibration=args.calibration,
            cache_dir=args.engine_cache,
            dla_core=args.dla_core,
            **workspace,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def server_config(args: argparse.Namespace, recipes: tuple[str, ...], data_dir: Path):
    """The one place where flags become a ServerConfig (ConfigError, before any model loads, when they cannot)."""
    from inserve.server.config import CamConfig, DetectorConfig, ImageConfig
    from inserve.server.recipes import check_recipe_names

    check_recipe_names(recipes)
    config = ServerConfig(
        data_dir=data_dir,
        models=args.models,
        backbone=args.backbone,
        recipes=recipes,
        engine=engine_options(args),
        image=ImageConfig(long_side=args.long_side),
        dasr=DasrConfig(
            stop_stride=args.stop_stride,
            shape=args.shape,
            mode=args.dasr_mode,
            sigmas=args.sigmas,
            star_seeds=args.star_seeds,
        ),
        cam=CamConfig(mode=args.cam_mode),
        detector=DetectorConfig(path=args.detector),
        regions=RegionRecipeConfig(
            deep_region_source=args.deep_region_source,
            deep_region_fusion=args.deep_region_fusion,
            region_set_weight=args.region_set_weight,
            box_temperature=args.box_temperature,
        ),
    )
    if args.command == "serve":
        batcher = {
            "max_batch": args.max_batch,
            "max_delay_ms": args.max_delay_ms,
            "queue_depth": args.queue_depth,
            "runners": args.batch_runners,
            "buckets": tuple(args.buckets.split(",")) if args.buckets else None,
        }
        video = {"media_root": args.media_root, "max_concurrent": args.max_videos}
        config = replace(
            config,
            host=args.host,
            port=args.port,
            workers=args.workers,
            max_message_bytes=args.max_message_mb << 20,
            batcher=_given(config.batcher, batcher),
            video=_given(config.video, video),
        )
        config = apply_server_flags(config, args)
    return config


def _given(settings: T, flags: dict[str, object]) -> T:
    """`settings` with the flags that were given (not None); the defaults stay in server/config.py."""
    return replace(settings, **{name: value for name, value in flags.items() if value is not None})


def connect(args: argparse.Namespace) -> InstanceSearchClient:
    """The client a client command's flags (--server, --timeout, TLS and token) describe."""
    from inserve.clients.client import InstanceSearchClient

    deadlines = {} if args.timeout is None else {"timeout": args.timeout, "stream_timeout": args.timeout}
    return InstanceSearchClient(args.server, security=channel_security(args), **deadlines)


def cmd_export(args: argparse.Namespace) -> int:
    try:
        from inserve.export.onnx_export import ExportOptions, export_backbone
    except ImportError as exc:
        print(f"inserve export needs torch and onnx: pip install 'inserve[export]' ({exc})", file=sys.stderr)
        return 2
    from inserve.export.backbones import WeightsError

    if args.detector:
        from inserve.export.detector import export_detector

        try:
            path = export_detector(
                args.detector,
                args.out,
                args.weights,
                args.random_init,
                min_size=args.detector_min_size,
                max_size=2 * args.detector_min_size,
                check=not args.no_check,
            )
        except WeightsError as exc:
            print(f"inserve export: {exc}", file=sys.stderr)
            return 2
        print(f"exported {args.detector} to {path}; serve with --detector {path}")
        return 0

    options = ExportOptions(
        desc=args.desc_layer,
        cam_top_n=args.cam_top_n,
        dasr_strides=args.dasr_strides,
        default_stop_stride=args.stop_stride,
        check=not args.no_check,
    )
    try:
        manifest = export_backbone(args.backbone, args.out, args.weights, args.random_init, options)
    except (WeightsError, ValueError) as exc:
        print(f"inserve export: {exc}", file=sys.stderr)
        return 2
    print(f"exported {args.backbone} to {manifest.parent} (manifest {manifest})")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    from inserve.server.app import serve
    from inserve.server.security import SecurityError

    try:
        asyncio.run(serve(server_config(args, tuple(args.recipe.split(",")), args.data_dir)))
    except SecurityError as exc:
        print(f"inserve serve: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_build_engines(args: argparse.Namespace) -> int:
    """Every TensorRT engine the configuration needs, built (or imported from trtexec) ahead of serving."""
    from tqdm import tqdm

    from inserve.server.instance_search import serving_shapes
    from inserve.server.models import ModelBundle

    config = server_config(args, tuple(args.recipe.split(",")), args.data_dir)
    if config.engine.device not in ("tensorrt", "tensorrt-native") or config.engine.cache_dir is None:
        raise ConfigError("build-engines needs --device tensorrt or tensorrt-native and --engine-cache DIR")
    bundle = ModelBundle.open(config.models, config.backbone, config.engine, serving_shapes(config))
    for spec in args.import_plan:
        graph, _, plan = spec.partition("=")
        if not plan:
            raise ConfigError(f"--import-plan takes GRAPH.onnx=PLAN, got {spec!r}")
        print(f"{graph}: imported into {bundle.import_plan(graph, Path(plan))}")
    for name in tqdm(bundle.open_all(), total=len(bundle.entries()), desc="engines", unit="graph", file=sys.stderr):
        print(f"{name}: ready")
    return 0


def image_files(paths: list[Path]) -> Iterator[tuple[str, Path]]:
    """(id, path) of every image among files and folders (recursively); a folder's images are named by
    their path inside it."""
    for path in paths:
        if path.is_dir():
            for file in sorted(path.rglob("*")):
                if file.suffix.lower() in IMAGE_SUFFIXES and file.is_file():
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


def stored_recipe_index(data_dir: Path):
    """The index of a data directory with the space settings of the recipes it holds (default configuration)."""
    from inserve.server.index import InstanceIndex, MetadataStore
    from inserve.server.recipes import RECIPES, build_recipes, recipe_specs

    store = MetadataStore(Path(data_dir) / "index.sqlite")
    names = sorted({recipe for recipe, *_ in store.spaces()} & set(RECIPES))
    store.close()
    return InstanceIndex(data_dir, specs=recipe_specs(build_recipes(names, ServerConfig())))


def cmd_whiten(args: argparse.Namespace) -> int:
    index = stored_recipe_index(args.data_dir)
    try:
        stats = sorted(index.stats(), key=lambda s: index.spec(s.recipe, s.kind).aggregate is not None)
        for s in stats:
            if args.recipe in (None, s.recipe) and index.learns(s.recipe, s.kind) and s.vectors >= 2:
                version = index.learn_whitening(s.recipe, s.kind, args.dims)
                print(f"{s.recipe}/{s.kind}: whitening v{version} from {s.vectors} vectors")
    finally:
        index.close()
    return 0


def codebook_vectors(args: argparse.Namespace, source: Path):
    """Region vectors to learn the VLAD codebook from: another data directory's index, a gnd.json dataset's
    images, or a folder of images (described with dasr_star_vlad's regions in-process)."""
    from inserve.server.codebook import RECIPE, vectors_from_images, vectors_from_index

    if (source / "index.sqlite").is_file():
        return vectors_from_index(source)
    if (source / "gnd.json").is_file():
        from inserve.server.evaluation import Dataset

        dataset = Dataset.load(source)
        paths = [dataset.path(name) for name in dataset.images]
    else:
        paths = [path for _, path in image_files([source])]
    from inserve.server.instance_search import InstanceSearch

    with tempfile.TemporaryDirectory(prefix="inserve-codebook-") as scratch:
        service = InstanceSearch(server_config(args, (RECIPE,), Path(scratch)))
        try:

            def describe(images: list[bytes]):
                described = service.describe([service.load(data) for data in images])
                return [v.raw for d in described for v in d[RECIPE].vectors if v.kind == "region"]

            return vectors_from_images(describe, paths)
        finally:
            service.close()


def cmd_learn_codebook(args: argparse.Namespace) -> int:
    from inserve.server.codebook import learn_codebook, save_codebook

    vectors = codebook_vectors(args, args.source)
    centroids = learn_codebook(vectors, args.k)
    index = stored_recipe_index(args.data_dir)
    try:
        version = save_codebook(index, centroids, f"{args.source.resolve()} ({len(vectors)} regions)")
    finally:
        index.close()
    print(f"dasr_star_vlad codebook v{version}: k={args.k} from {len(vectors)} region vectors of {args.source}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from inserve.server.config import ConfigError
    from inserve.server.evaluation import Dataset, evaluate
    from inserve.server.instance_search import InstanceSearch, RequestError, UnavailableError
    from inserve.server.search import SearchOptions

    dataset = Dataset.load(args.dataset)
    bars: dict[str, tqdm] = {}

    def progress(stage: str, done: int, total: int) -> None:
        if args.quiet:
            return
        bar = bars.setdefault(stage, tqdm(total=total, desc=stage, unit="img", file=sys.stderr))
        bar.update(done - bar.n)

    with tempfile.TemporaryDirectory(prefix="inserve-eval-") as scratch:
        config = server_config(args, (args.recipe,), args.data_dir or Path(scratch))
        service = InstanceSearch(config)
        try:
            if args.codebook_from is not None:
                from inserve.server.codebook import learn_codebook, save_codebook

                vectors = codebook_vectors(args, args.codebook_from)
                save_codebook(service.index, learn_codebook(vectors, config.regions.vlad_k), str(args.codebook_from))
            options = SearchOptions(query_expansion=args.qe, rerank_top=args.rerank)
            try:  # options the recipe cannot take are refused now, not after indexing the dataset
                service.search_options(args.recipe, options)
            except (RequestError, UnavailableError) as exc:
                raise ConfigError(str(exc)) from exc
            result = evaluate(service, dataset, args.recipe, options, progress)
        finally:
            service.close()
            for bar in bars.values():
                bar.close()
    if args.json:
        print(json.dumps(result.as_json()))
    else:
        loc = "n/a (no boxes)" if result.loc_iou50 is None else f"{result.loc_iou50:.3f}"
        print(
            f"{result.dataset} / {result.recipe}: mAP {result.map:.3f}  mP@10 {result.mp10:.3f}  "
            f"loc IoU>=0.5 {loc}  ({result.images} images, {result.queries} queries, {result.seconds:.0f} s)"
        )
    return 0


def _add_serve_flags(p: argparse.ArgumentParser) -> None:
    """What `serve` takes; `build-engines` takes the same, so that it builds the engines serve will open."""
    p.add_argument("--data-dir", type=Path, default=Path("data"))
    p.add_argument("--port", type=int, default=50051)
    p.add_argument("--host", default=ServerConfig.host, help="interface to bind; [::] = every interface")
    p.add_argument(
        "--recipe",
        default=",".join(ServerConfig.recipes),
        help="recipe(s) to index with, comma-separated; first = default",
    )
    p.add_argument("--workers", type=int, default=2, help="threads decoding images and writing the index")
    p.add_argument("--max-message-mb", type=int, default=64)
    batching = "(default: BatcherConfig in server/config.py)"
    p.add_argument("--max-batch", type=int, default=None, help=f"images per network run {batching}")
    p.add_argument("--max-delay-ms", type=float, default=None, help=f"how long an image waits for company {batching}")
    p.add_argument("--queue-depth", type=int, default=None, help=f"images waiting, beyond: busy {batching}")
    p.add_argument("--batch-runners", type=int, default=None, help=f"batches running at once {batching}")
    p.add_argument("--buckets", default=None, help=f"input shapes (W:H at the long side) to pad into {batching}")
    p.add_argument("--media-root", type=Path, default=None, help="IndexVideo may read server files under this folder")
    p.add_argument("--max-videos", type=int, default=None, help="videos indexing at once (default: VideoConfig)")
    _add_model_flags(p)
    add_server_flags(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="inserve", description="Instance-search inference service")
    parser.add_argument("--log-level", default="WARNING")
    parser.add_argument("--log-format", default="text", choices=FORMATS, help="json: one JSON object a line")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("export", help="export a backbone or a detector to ONNX (needs the [export] extra)")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument(
        "--detector",
        default=None,
        choices=["fasterrcnn_resnet50_fpn", "fasterrcnn_mobilenet_v3_large_fpn"],
        help="export this torchvision Faster R-CNN (with --weights, or --random-init for tests) instead of a backbone",
    )
    p.add_argument("--detector-min-size", type=int, default=512, help="the detector resizes the short side to this")
    p.add_argument("--out", type=Path, default=Path("models"))
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--weights", type=Path, help="torchvision-format state dict")
    weights.add_argument("--random-init", action="store_true", help="untrained weights, for tests only")
    p.add_argument("--desc-layer", default=None, help="descriptor layer (default: the backbone's)")
    p.add_argument("--cam-top-n", type=int, default=64)
    p.add_argument("--dasr-strides", type=_ints, default=(8,), help="stop strides to export, e.g. 1,4,8")
    p.add_argument("--stop-stride", type=int, default=8, help="default DASR stop stride (dasr_*.onnx)")
    p.add_argument("--no-check", action="store_true", help="skip onnx.checker and the parity check")
    p.set_defaults(fn=cmd_export)

    serve = sub.add_parser("serve", help="run the gRPC server")
    build = sub.add_parser(
        "build-engines", help="build every TensorRT engine the serve flags need, ahead of serving (a Jetson's install)"
    )
    build.add_argument("--import-plan", action="append", default=[], help="GRAPH.onnx=PLAN built by trtexec")
    build.set_defaults(fn=cmd_build_engines)
    for p in (serve, build):
        _add_serve_flags(p)
    serve.set_defaults(fn=cmd_serve)

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
            p.add_argument("--top-k", type=int, default=10)
            p.add_argument("--recipe", default="")
            p.add_argument(
                "--qe", type=int, default=None, help="query expansion with the top M hits (default: recipe's)"
            )
            p.add_argument("--rerank", type=int, default=None, help="spatially re-rank the top N (default: recipe's)")
            p.add_argument("--show", type=Path, default=None, help="write the query and hits with boxes to this PNG")
            p.add_argument("--group", choices=GROUPINGS, default="none", help="one hit per video or per shot")
        elif name == "delete":
            p.add_argument("ids", nargs="+")

    p = sub.add_parser("whiten", help="learn PCA-whitening from the indexed vectors (server stopped)")
    p.add_argument("--data-dir", type=Path, default=Path("data"))
    p.add_argument("--recipe", default=None)
    p.add_argument("--dims", type=int, default=None)
    p.set_defaults(fn=cmd_whiten)

    p = sub.add_parser("learn-codebook", help="learn dasr_star_vlad's VLAD codebook on other data (server stopped)")
    p.add_argument("--data-dir", type=Path, default=Path("data"), help="the index that will use the codebook")
    p.add_argument(
        "--from",
        dest="source",
        type=Path,
        required=True,
        help="another data directory, gnd.json dataset or image folder",
    )
    p.add_argument("--k", type=int, default=4, help="codebook size (seed 004: 4)")
    _add_model_flags(p)
    p.set_defaults(fn=cmd_learn_codebook)

    p = sub.add_parser("eval", help="mAP, mP@10 and localisation on a gnd.json dataset, in-process")
    p.add_argument("dataset", type=Path)
    p.add_argument("--recipe", default=ServerConfig.recipes[0])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--qe", type=int, default=None, help="query expansion with the top M hits (default: recipe's)")
    p.add_argument("--rerank", type=int, default=None, help="spatially re-rank the top N (default: recipe's)")
    p.add_argument(
        "--codebook-from", type=Path, default=None, help="dasr_star_vlad: learn the codebook from this other data"
    )
    p.add_argument("--data-dir", type=Path, default=None, help="keep the index here (default: a temp dir)")
    p.add_argument("--quiet", action="store_true")
    _add_model_flags(p)
    p.set_defaults(fn=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    import grpc

    from inserve.engines import EngineUnavailable
    from inserve.server.config import ConfigError
    from inserve.server.models import ModelsError

    try:
        return args.fn(args)
    except ConfigError as exc:  # flags that cannot work together: one line saying what is valid
        print(f"inserve {args.command}: {exc}", file=sys.stderr)
        return 2
    except grpc.RpcError as exc:  # refused calls the command does not explain itself (auth, limits...)
        print(f"inserve {args.command}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except (ModelsError, EngineUnavailable, FileNotFoundError) as exc:  # no export, no such dataset, no device
        print(f"inserve {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
