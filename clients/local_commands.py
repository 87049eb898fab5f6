"""The commands that run here, without a server: export, serve, build-engines, whiten, learn-codebook, eval."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from inserve.clients.cli_flags import (
    add_model_flags,
    add_serve_flags,
    add_store_flags,
    given,
    server_config,
    store_of,
)
from inserve.clients.remote_commands import image_files
from inserve.server.config import ConfigError, ServerConfig


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v)


def cmd_export(args: argparse.Namespace) -> int:
    try:
        from inserve.export.onnx_export import ExportOptions, export_backbone
    except ImportError as exc:
        print(f"inserve export needs torch and onnx: pip install 'inserve[export]' ({exc})", file=sys.stderr)
        return 2
    from inserve.export.backbones import WeightsError

    if args.detector:
        from inserve.export.detector import export_detector

        size = args.detector_min_size
        sizes = {} if size is None else {"min_size": size, "max_size": 2 * size}
        try:
            path = export_detector(
                args.detector, args.out, args.weights, args.random_init, check=not args.no_check, **sizes
            )
        except WeightsError as exc:
            print(f"inserve export: {exc}", file=sys.stderr)
            return 2
        print(f"exported {args.detector} to {path}; serve with --detector {path}")
        return 0

    strides = given(cam_top_n=args.cam_top_n, dasr_strides=args.dasr_strides, default_stop_stride=args.stop_stride)
    options = ExportOptions(desc=args.desc_layer, check=not args.no_check, **strides)
    try:
        manifest = export_backbone(args.backbone, args.out, args.weights, args.random_init, options)
    except (WeightsError, ValueError) as exc:
        print(f"inserve export: {exc}", file=sys.stderr)
        return 2
    print(f"exported {args.backbone} to {manifest.parent} (manifest {manifest})")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    from inserve.server.grpc.app import serve
    from inserve.server.grpc.security import SecurityError

    try:
        asyncio.run(serve(server_config(args, tuple(args.recipe.split(",")), args.data_dir)))
    except SecurityError as exc:
        print(f"inserve serve: {exc}", file=sys.stderr)
        return 2
    return 0


def plan_import(spec: str) -> tuple[str, Path]:
    """(graph file, plan) of `--import-plan GRAPH.onnx=PLAN`."""
    graph, _, plan = spec.partition("=")
    if not graph or not plan:
        raise ConfigError(f"--import-plan takes GRAPH.onnx=PLAN, got {spec!r}")
    return graph, Path(plan)


def cmd_build_engines(args: argparse.Namespace) -> int:
    """Every TensorRT engine the configuration needs, built (or imported from trtexec) ahead of serving."""
    from tqdm import tqdm

    from inserve.server.instance_search import serving_shapes
    from inserve.server.models import ModelBundle

    config = server_config(args, tuple(args.recipe.split(",")), args.data_dir)
    if config.engine.device not in ("tensorrt", "tensorrt-native") or config.engine.cache_dir is None:
        raise ConfigError("build-engines needs --device tensorrt or tensorrt-native and --engine-cache DIR")
    imports = [plan_import(spec) for spec in args.import_plan]
    shapes = serving_shapes(config)
    bundle = ModelBundle.open(config.models, config.backbone, config.engine, shapes, open_backbone=False)
    for graph, plan in imports:  # before any graph opens, so that an imported plan is loaded rather than built
        try:
            print(f"{graph}: imported into {bundle.import_plan(graph, plan)}")
        except ValueError as exc:  # a plan that this TensorRT, this GPU or this graph cannot take
            raise ConfigError(f"--import-plan {graph}: {exc}") from exc
    # the bar shows after a second: a machine that cannot build at all says so in one line, without a bar
    progress = tqdm(
        bundle.open_all(), total=len(bundle.entries()), desc="engines", unit="graph", file=sys.stderr, delay=1
    )
    for name in progress:
        print(f"{name}: ready")
    return 0


def cmd_bulk_index(args: argparse.Namespace) -> int:
    try:
        from inserve.server.bulk_index import bulk_index
    except ImportError as exc:
        print(f"inserve bulk-index needs Ray: pip install 'inserve[cluster]' ({exc})", file=sys.stderr)
        return 2
    from tqdm import tqdm

    from inserve.engines.precision import IMAGE_SUFFIXES
    from inserve.server.video.decode import VIDEO_SUFFIXES

    config = server_config(args, tuple(args.recipe.split(",")), args.data_dir)
    found = image_files(args.paths, IMAGE_SUFFIXES + VIDEO_SUFFIXES, dangling=True)
    files = [(args.id_prefix + name, path) for name, path in found]
    # the bar shows after a second: a refusal before anything is indexed is one line, without a bar
    with tqdm(total=len(files), unit="img", disable=args.quiet, file=sys.stderr, delay=1) as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        result = bulk_index(config, files, args.ray_address, args.workers, progress)
    for external_id, why in sorted(result.failed.items()):
        print(f"{external_id}: not indexed: {why}", file=sys.stderr)
    print(f"indexed {result.indexed} images and videos, {result.skipped} stored already, {len(result.failed)} failed")
    return 1 if result.failed else 0


def stored_recipe_index(args: argparse.Namespace):
    """The index the store flags name, with the space settings of the recipes it holds (default configuration)."""
    from inserve.server.index import MetadataStore, open_index
    from inserve.server.index.data_dir import INDEX_FILE, DataDirLock
    from inserve.server.recipes import RECIPES, build_recipes, recipe_specs

    data_dir, store = store_of(args, args.data_dir)
    config = ServerConfig().index
    if store:
        index = open_index(data_dir, store, config, {})
        held = {s.recipe for s in index.stats()}
        index.close()
    else:  # refused here, before reading, when another process has the directory open
        lock = DataDirLock(data_dir)
        metadata = MetadataStore(Path(data_dir) / INDEX_FILE)
        held = {recipe for recipe, *_ in metadata.spaces()}
        metadata.close()
        lock.release()
    specs = recipe_specs(build_recipes(sorted(held & set(RECIPES)), ServerConfig()))
    return open_index(data_dir, store, config, specs)


def cmd_whiten(args: argparse.Namespace) -> int:
    from inserve.server.index.transforms import any_vectors, learn_transforms

    index = stored_recipe_index(args)
    try:
        learned = learn_transforms(index, any_vectors, args.recipe, args.dims)
        for s in index.stats():
            if (s.recipe, s.kind) in learned:
                print(f"{s.recipe}/{s.kind}: whitening v{learned[s.recipe, s.kind]} from {s.vectors} vectors")
    finally:
        index.close()
    return 0


def codebook_vectors(args: argparse.Namespace, source: Path):
    """Region vectors to learn the VLAD codebook from: another data directory's index, a gnd.json dataset's
    images, or a folder of images (described with dasr_star_vlad's regions in-process)."""
    from inserve.server.codebook import RECIPE, vectors_from_images, vectors_from_index
    from inserve.server.index.data_dir import INDEX_FILE

    if (source / INDEX_FILE).is_file():
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
    index = stored_recipe_index(args)
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
                service.plan(args.recipe, options=options)
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


def add_local_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a backbone or a detector to ONNX (needs the [export] extra)")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument(
        "--detector",
        default=None,
        choices=["fasterrcnn_resnet50_fpn", "fasterrcnn_mobilenet_v3_large_fpn"],
        help="export this torchvision Faster R-CNN (with --weights, or --random-init for tests) instead of a backbone",
    )
    p.add_argument("--detector-min-size", type=int, help="the detector resizes the short side to this (default 512)")
    p.add_argument("--out", type=Path, default=Path("models"))
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--weights", type=Path, help="torchvision-format state dict")
    weights.add_argument("--random-init", action="store_true", help="untrained weights, for tests only")
    p.add_argument("--desc-layer", default=None, help="descriptor layer (default: the backbone's)")
    p.add_argument("--cam-top-n", type=int, help="classes the CAM head keeps (default 64)")
    p.add_argument("--dasr-strides", type=_ints, help="DASR stop strides to export, e.g. 1,4,8 (default 8)")
    p.add_argument("--stop-stride", type=int, help="the DASR stop stride dasr_*.onnx stops at (default 8)")
    p.add_argument("--no-check", action="store_true", help="skip onnx.checker and the parity check")
    p.set_defaults(fn=cmd_export)

    serve = sub.add_parser("serve", help="run the gRPC server")
    build = sub.add_parser(
        "build-engines", help="build every TensorRT engine the serve flags need, ahead of serving (a Jetson's install)"
    )
    build.add_argument("--import-plan", action="append", default=[], help="GRAPH.onnx=PLAN built by trtexec")
    build.set_defaults(fn=cmd_build_engines)
    for p in (serve, build):
        add_serve_flags(p)
    serve.set_defaults(fn=cmd_serve)

    p = sub.add_parser(
        "bulk-index",
        help="index images, videos and folders of them on a Ray cluster into a store (stop a data directory's server)",
    )
    p.add_argument("paths", type=Path, nargs="+")
    add_store_flags(p)
    p.add_argument("--recipe", default=",".join(ServerConfig.recipes), help="recipe(s), comma-separated")
    p.add_argument("--ray-address", default=None, help="a Ray cluster (ray://HOST:10001 or auto; default: local)")
    p.add_argument("--workers", type=int, default=None, help="describing at once (default: one per CPU)")
    p.add_argument("--id-prefix", default="")
    p.add_argument("--quiet", action="store_true")
    add_model_flags(p)
    p.set_defaults(fn=cmd_bulk_index)

    p = sub.add_parser("whiten", help="learn PCA-whitening from the indexed vectors (server stopped)")
    add_store_flags(p)
    p.add_argument("--recipe", default=None)
    p.add_argument("--dims", type=int, default=None)
    p.set_defaults(fn=cmd_whiten)

    p = sub.add_parser("learn-codebook", help="learn dasr_star_vlad's VLAD codebook on other data (server stopped)")
    add_store_flags(p)  # the index that will use the codebook
    p.add_argument(
        "--from",
        dest="source",
        type=Path,
        required=True,
        help="another data directory, gnd.json dataset or image folder",
    )
    p.add_argument("--k", type=int, default=4, help="codebook size (seed 004: 4)")
    add_model_flags(p)
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
    add_model_flags(p)
    p.set_defaults(fn=cmd_eval)
