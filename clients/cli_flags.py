"""The CLI's flags and what they become: a ServerConfig for the commands that run the networks (serve,
build-engines, eval, learn-codebook), a ChannelSecurity for the ones that call a server. Every default is
server/config.py's (or the engines' EngineOptions): flags left out keep it."""

from __future__ import annotations

import argparse
import os
from dataclasses import replace
from pathlib import Path

from inserve.clients.channels import ChannelSecurity
from inserve.engines.base import DEVICES, PRECISIONS, EngineOptions
from inserve.server.config import (
    QUERY_REGION_SOURCES,
    REGION_MODES,
    STAR_SEED_RULES,
    STORE_FORMS,
    CamConfig,
    ConfigError,
    DasrConfig,
    DetectorConfig,
    ImageConfig,
    RegionRecipeConfig,
    SecurityConfig,
    ServerConfig,
    milvus_uri,
)

TOKEN_ENV = "INSERVE_TOKEN"


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """What every command that runs the networks takes (serve, build-engines, eval, learn-codebook)."""
    p.add_argument("--models", type=Path, default=ServerConfig.models, help="where `inserve export` wrote")
    p.add_argument("--backbone", default=ServerConfig.backbone)
    p.add_argument("--device", default=EngineOptions.device, choices=DEVICES)
    threads = EngineOptions.intra_op_threads
    p.add_argument("--threads", type=int, default=threads, help="intra-op threads per engine (0 = runtime default)")
    p.add_argument(
        "--no-cpu-arena",
        dest="cpu_arena",
        action="store_false",
        help="run ONNX Runtime on the CPU without its memory arena: about half the memory, 16%% slower",
    )
    tensorrt = p.add_argument_group("TensorRT (--device tensorrt or tensorrt-native; profiles follow the buckets)")
    tensorrt.add_argument(
        "--precision", default=EngineOptions.precision, choices=PRECISIONS, help="int8 needs --calibration"
    )
    tensorrt.add_argument("--calibration", type=Path, default=None, help="folder of images to calibrate int8 on")
    tensorrt.add_argument("--engine-cache", type=Path, default=None, help="keep built engines and timing caches here")
    workspace = EngineOptions.workspace_bytes >> 20
    tensorrt.add_argument("--workspace-mb", type=int, default=workspace, help="builder workspace, MiB")
    tensorrt.add_argument("--dla-core", type=int, default=None, help="build for this DLA core (Jetson)")
    p.add_argument("--long-side", type=int, default=ImageConfig.long_side, help="images are resized to this long side")
    p.add_argument("--stop-stride", type=int, default=None, help="DASR back-propagation stop stride")
    p.add_argument("--shape", default=DasrConfig.shape, choices=["moments", "official"], help="DASR shape estimation")
    p.add_argument(
        "--dasr-mode", default=DasrConfig.mode, choices=REGION_MODES, help="DASR boxes: exact maps or adjoint moments"
    )
    p.add_argument("--sigmas", type=float, default=DasrConfig.sigmas, help="DASR adjoint boxes: standard deviations")
    p.add_argument("--star-seeds", default=DasrConfig.star_seeds, choices=STAR_SEED_RULES, help="DASR* seeds")
    p.add_argument(
        "--detector", type=Path, default=None, help="detector.onnx (or its export folder) for deepvision/deep_region"
    )
    p.add_argument("--cam-mode", default=CamConfig.mode, choices=["offline", "online"], help="cam: class aggregation")
    p.add_argument(
        "--deep-region-source", default=RegionRecipeConfig.deep_region_source, choices=["detector", "dasr_star"]
    )
    p.add_argument(
        "--deep-region-fusion", default=RegionRecipeConfig.deep_region_fusion, choices=["concat", "mean", "max"]
    )
    p.add_argument(
        "--region-set-weight",
        type=float,
        default=RegionRecipeConfig.region_set_weight,
        help="whole_and_regions: weight of the mean of the query regions' best matches (0..1)",
    )
    p.add_argument(
        "--whole-weight",
        type=float,
        default=RegionRecipeConfig.whole_weight,
        help="whole_and_regions, queries without a box: weight of the whole photos' similarity (0..1)",
    )
    p.add_argument(
        "--query-low-side",
        type=int,
        default=RegionRecipeConfig.query_low_side,
        help="whole_and_regions, queries with a box: also match the crop as seen at this long side; 0 = off",
    )
    p.add_argument(
        "--box-temperature",
        type=float,
        default=RegionRecipeConfig.box_temperature,
        help="whole_and_regions: hits' boxes average the regions by softmax(similarity / this); 0 = best region",
    )
    p.add_argument(
        "--query-regions",
        choices=QUERY_REGION_SOURCES,
        default=RegionRecipeConfig.query_regions,
        help="whole_and_regions: where a query's own regions come from",
    )


def add_store_flags(p: argparse.ArgumentParser) -> None:
    """Where the index lives: a data directory (the embedded default) or a shared Milvus store."""
    p.add_argument("--data-dir", type=Path, default=ServerConfig.data_dir, help="the embedded store's directory")
    p.add_argument(
        "--store",
        default=None,
        help=f"{STORE_FORMS}; a directory is as --data-dir, a name ending .db is a milvus-lite file",
    )


def store_of(args: argparse.Namespace, data_dir: Path) -> tuple[Path, str]:
    """(data directory, Milvus store) the store flags name: `--store DIR` is `--data-dir DIR`."""
    store = getattr(args, "store", None)
    if store is None:
        return data_dir, ""
    if milvus_uri(store) is None:
        return Path(store), ""
    return data_dir, store


def add_serve_flags(p: argparse.ArgumentParser) -> None:
    """What `serve` takes; `build-engines` takes the same, so that it builds the engines serve will open."""
    add_store_flags(p)
    p.add_argument("--port", type=int, default=ServerConfig.port)
    p.add_argument("--host", default=ServerConfig.host, help="interface to bind; [::] = every interface")
    p.add_argument(
        "--recipe",
        default=",".join(ServerConfig.recipes),
        help="recipe(s) to index with, comma-separated; first = default",
    )
    p.add_argument(
        "--workers", type=int, default=ServerConfig.workers, help="threads decoding images and writing the index"
    )
    p.add_argument("--max-message-mb", type=int, default=ServerConfig.max_message_bytes >> 20)
    batching = "(default: BatcherConfig in server/config.py)"
    p.add_argument("--max-batch", type=int, default=None, help=f"images per network run {batching}")
    p.add_argument("--max-delay-ms", type=float, default=None, help=f"how long an image waits for company {batching}")
    p.add_argument("--queue-depth", type=int, default=None, help=f"images waiting, beyond: busy {batching}")
    p.add_argument("--batch-runners", type=int, default=None, help=f"batches running at once {batching}")
    p.add_argument("--urgent-runners", type=int, default=None, help=f"runners that take only searches {batching}")
    p.add_argument("--buckets", default=None, help=f"input shapes (W:H at the long side) to pad into {batching}")
    p.add_argument("--media-root", type=Path, default=None, help="IndexVideo may read server files under this folder")
    p.add_argument("--max-videos", type=int, default=None, help="videos indexing at once (default: VideoConfig)")
    add_model_flags(p)
    add_server_flags(p)


def engine_options(args: argparse.Namespace) -> EngineOptions:
    """The EngineOptions the model flags describe (ConfigError when they cannot work together)."""
    try:
        return EngineOptions(
            device=args.device,
            intra_op_threads=args.threads,
            cpu_arena=args.cpu_arena,
            precision=args.precision,
            calibration=args.calibration,
            cache_dir=args.engine_cache,
            dla_core=args.dla_core,
            workspace_bytes=args.workspace_mb << 20,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def server_config(args: argparse.Namespace, recipes: tuple[str, ...], data_dir: Path) -> ServerConfig:
    """The one place where flags become a ServerConfig (ConfigError, before any model loads, when they cannot)."""
    from inserve.server.recipes import check_recipe_names

    check_recipe_names(recipes)
    data_dir, store = store_of(args, data_dir)
    config = ServerConfig(
        data_dir=data_dir,
        store=store,
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
            query_regions=args.query_regions,
            whole_weight=args.whole_weight,
            query_low_side=args.query_low_side,
        ),
    )
    if args.command in ("serve", "build-engines"):  # the same batcher: TensorRT profiles follow its shapes
        batcher = {
            "max_batch": args.max_batch,
            "max_delay_ms": args.max_delay_ms,
            "queue_depth": args.queue_depth,
            "runners": args.batch_runners,
            "urgent_runners": args.urgent_runners,
            "buckets": tuple(args.buckets.split(",")) if args.buckets else None,
        }
        video = {"media_root": args.media_root, "max_concurrent": args.max_videos}
        config = replace(
            config,
            host=args.host,
            port=args.port,
            workers=args.workers,
            max_message_bytes=args.max_message_mb << 20,
            batcher=replace(config.batcher, **given(**batcher)),
            video=replace(config.video, **given(**video)),
        )
        config = apply_server_flags(config, args)
    if not store and args.command != "build-engines":  # a data directory that cannot hold an index: one line now
        from inserve.server.index.data_dir import usable_data_dir

        usable_data_dir(data_dir)
    return config


def add_server_flags(p: argparse.ArgumentParser) -> None:
    """Flags left out keep server/config.py's defaults (documented in the README's Limits table)."""
    limits = p.add_argument_group("limits (default: server/config.py)")
    limits.add_argument("--max-pixels", type=int, help="largest decoded image or video frame, in pixels")
    limits.add_argument("--max-concurrent-rpcs", type=int, help="calls served at once (0 = no limit)")
    limits.add_argument("--max-concurrent-streams", type=int, help="of those, calls streaming requests (default 3/4)")
    limits.add_argument("--stream-idle-timeout", type=float, help="seconds a stream may keep the server waiting")
    limits.add_argument("--max-streams-per-connection", type=int, help="HTTP/2 streams one client may open")
    limits.add_argument("--request-deadline", type=float, help="seconds a request may take (0 = the client's)")
    limits.add_argument("--shutdown-grace", type=float, help="seconds calls in flight get to finish on SIGTERM")
    limits.add_argument("--max-video-mb", type=int, help="largest video upload, MiB")
    limits.add_argument("--max-live-streams", type=int, help="live streams indexed at once")
    limits.add_argument("--live-window", type=int, help="keyframes of a live stream being described at once")
    limits.add_argument("--max-metadata-kb", type=int, help="metadata an image or video may carry, KiB")
    limits.add_argument("--snapshot-every", type=int, help="vectors added between HNSW graph snapshots")
    security = p.add_argument_group("security (default: plaintext, no token)")
    security.add_argument("--tls-cert", type=Path, help="PEM certificate chain: serve TLS only")
    security.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    security.add_argument("--tls-client-ca", type=Path, help="require client certificates signed by this CA")
    security.add_argument("--token-file", type=Path, help="accepted bearer tokens, one a line")
    ops = p.add_argument_group("operations")
    ops.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port (0 = any free one)")
    ops.add_argument("--metrics-host", help="address of the metrics endpoint (default 127.0.0.1)")


def given(**values: object) -> dict[str, object]:
    """The flags that were given (not None), for a dataclass whose defaults apply to the rest."""
    return {name: value for name, value in values.items() if value is not None}


def apply_server_flags(config: ServerConfig, args: argparse.Namespace) -> ServerConfig:
    """ServerConfig with the flags of add_server_flags that were given (and the global --log-format)."""
    no_limit = {0: None}  # 0 and 0.0 alike
    return replace(
        config,
        image=replace(config.image, **given(max_pixels=args.max_pixels)),
        index=replace(config.index, **given(snapshot_every=args.snapshot_every)),
        video=replace(
            config.video,
            **given(
                max_upload_bytes=None if args.max_video_mb is None else args.max_video_mb << 20,
                max_live_streams=args.max_live_streams,
                live_window=args.live_window,
            ),
        ),
        limits=replace(
            config.limits,
            **given(
                max_streams_per_connection=args.max_streams_per_connection,
                shutdown_grace_s=args.shutdown_grace,
                max_metadata_bytes=None if args.max_metadata_kb is None else args.max_metadata_kb << 10,
            ),
            **{
                name: no_limit.get(value, value)
                for name, value in given(
                    max_concurrent_rpcs=args.max_concurrent_rpcs,
                    max_concurrent_streams=args.max_concurrent_streams,
                    stream_idle_timeout_s=args.stream_idle_timeout,
                    request_deadline_s=args.request_deadline,
                ).items()
            },
        ),
        security=SecurityConfig(args.tls_cert, args.tls_key, args.tls_client_ca, args.token_file),
        ops=replace(
            config.ops,
            **given(metrics_port=args.metrics_port, metrics_host=args.metrics_host, log_format=args.log_format),
        ),
    )


def add_connection_flags(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("connection security")
    group.add_argument("--tls", action="store_true", help="use TLS, trusting the system's roots")
    group.add_argument("--tls-ca", type=Path, default=None, help="PEM roots of the server's certificate (implies TLS)")
    group.add_argument("--tls-cert", type=Path, default=None, help="client certificate, for mutual TLS")
    group.add_argument("--tls-key", type=Path, default=None, help="private key of --tls-cert")
    group.add_argument("--tls-server-name", default=None, help="name to check the server's certificate against")
    group.add_argument(
        "--token-file", type=Path, default=None, help=f"file holding the bearer token (default: ${TOKEN_ENV})"
    )


def first_token(path: Path) -> str | None:
    """The first token line of a token file (the server's format: one a line, `#` comments)."""
    lines = (line.strip() for line in Path(path).read_text().splitlines())
    return next((line for line in lines if line and not line.startswith("#")), None)


def channel_security(args: argparse.Namespace) -> ChannelSecurity:
    token = first_token(args.token_file) if args.token_file is not None else os.environ.get(TOKEN_ENV)
    return ChannelSecurity(
        tls=args.tls,
        ca=args.tls_ca,
        cert=args.tls_cert,
        key=args.tls_key,
        server_name=args.tls_server_name,
        token=token or None,
    )
