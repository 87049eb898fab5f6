"""CLI flags for limits, security and operations: on `serve` they become ServerConfig fields, on the client
commands a ChannelSecurity."""

from __future__ import annotations

import argparse
import os
from dataclasses import replace
from pathlib import Path

from inserve.clients.channels import ChannelSecurity

TOKEN_ENV = "INSERVE_TOKEN"


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


def _given(**values: object) -> dict[str, object]:
    return {name: value for name, value in values.items() if value is not None}


def apply_server_flags(config, args: argparse.Namespace):
    """ServerConfig with the flags of add_server_flags that were given (and the global --log-format)."""
    from inserve.server.config import SecurityConfig

    no_limit = {0: None}  # 0 and 0.0 alike
    return replace(
        config,
        image=replace(config.image, **_given(max_pixels=args.max_pixels)),
        index=replace(config.index, **_given(snapshot_every=args.snapshot_every)),
        video=replace(
            config.video,
            **_given(
                max_upload_bytes=None if args.max_video_mb is None else args.max_video_mb << 20,
                max_live_streams=args.max_live_streams,
                live_window=args.live_window,
            ),
        ),
        limits=replace(
            config.limits,
            **_given(
                max_streams_per_connection=args.max_streams_per_connection,
                shutdown_grace_s=args.shutdown_grace,
                max_metadata_bytes=None if args.max_metadata_kb is None else args.max_metadata_kb << 10,
            ),
            **{
                name: no_limit.get(value, value)
                for name, value in _given(
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
            **_given(metrics_port=args.metrics_port, metrics_host=args.metrics_host, log_format=args.log_format),
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
