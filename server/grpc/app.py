"""Server bootstrap: the gRPC server with health and reflection, TLS, token auth, metrics and limits;
graceful stop on SIGTERM / SIGINT (stop taking calls, drain those in flight, snapshot, exit 0)."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import signal
import socket
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from inserve.server.config import ConfigError, ServerConfig
from inserve.server.grpc.call_slots import CallSlotsInterceptor
from inserve.server.grpc.interceptors import MalformedRequestInterceptor
from inserve.server.grpc.metrics import MetricsEndpoint
from inserve.server.grpc.security import TokenAuthInterceptor, load_tokens, server_credentials
from inserve.server.grpc.servicer import InstanceSearchServicer
from inserve.server.instance_search import InstanceSearch
from inserve.v1 import inserve_pb2 as pb
from inserve.v1 import inserve_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["InstanceSearch"].full_name


# keepalive: clients may ping every 10 s on a connection with calls in flight (ours ping after 30 s of silence,
# clients/channels.py), and the server pings a silent connection after 60 s, so that the call of a client that
# vanished (a camera's uplink cut) ends and releases its live stream id within 80 s
KEEPALIVE_MIN_PING_INTERVAL_MS = 10_000
SERVER_KEEPALIVE_TIME_MS = 60_000
SERVER_KEEPALIVE_TIMEOUT_MS = 20_000


def server_options(config: ServerConfig) -> list[tuple[str, int]]:
    return [
        # gRPC sets SO_REUSEPORT by default, which lets a second server bind a port in use and take half of its
        # new connections; without it a port in use is an error at start-up
        ("grpc.so_reuseport", 0),
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_concurrent_streams", config.limits.max_streams_per_connection),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", KEEPALIVE_MIN_PING_INTERVAL_MS),
        ("grpc.keepalive_time_ms", SERVER_KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", SERVER_KEEPALIVE_TIMEOUT_MS),
    ]


def is_loopback(host: str) -> bool:
    """True when binding `host` keeps the server reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # another host name: it may resolve anywhere
        return False


def check_port_free(host: str, port: int) -> None:
    """ConfigError when the address cannot be bound: in use by another server, or not this machine's. Asked
    before the models load and the data directory is opened, and in one line (gRPC's own bind error comes
    with a log line of its own); `grpc.so_reuseport` 0 refuses a port taken between this check and the bind."""
    if port == 0:
        return
    try:
        found = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    for family, kind, proto, _, address in found:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds: TIME_WAIT does not count
            try:
                probe.bind(address)
            except OSError as exc:
                why = "the port is in use" if exc.errno == errno.EADDRINUSE else exc.strerror
                raise ConfigError(f"cannot listen on {host}:{port}: {why}") from exc


async def serve(config: ServerConfig) -> None:
    """Run until SIGTERM or SIGINT; then stop taking calls, finish those in flight, snapshot, return."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    credentials = server_credentials(config.security)  # bad security settings fail before the models load
    check_port_free(config.host, config.port)
    tokens = load_tokens(config.security.token_file) if config.security.token_file is not None else None

    core = InstanceSearch(config)
    executor = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="inserve-worker")
    metrics = MetricsEndpoint(config.ops, core)
    interceptors = [metrics.interceptor] + ([TokenAuthInterceptor(tokens)] if tokens else [])
    interceptors += [CallSlotsInterceptor(config.limits), MalformedRequestInterceptor()]
    server = grpc.aio.server(
        options=server_options(config),
        interceptors=interceptors,
    )
    pb_grpc.add_InstanceSearchServicer_to_server(InstanceSearchServicer(core, executor), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"{config.host}:{config.port}"
    try:
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError as exc:  # gRPC's "Failed to bind": in use, or an address this machine does not have
        executor.shutdown()
        metrics.close()
        core.close()  # gives the data directory back
        raise ConfigError(
            f"cannot listen on {address}: the port is in use, or the address is not this machine's"
        ) from (exc)
    if not (credentials or tokens or is_loopback(config.host)):
        log.warning(
            "listening on %s in plaintext without tokens: whoever reaches port %d can index, search and delete; "
            "add --tls-cert/--tls-key or --token-file, or bind --host localhost",
            config.host,
            port,
        )
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "inserve listening on port %d (%s%s; backbone %s, recipes %s, data %s)",
        port,
        "TLS" if credentials else "plaintext",
        ", client certificates required" if config.security.tls_client_ca else "",
        core.models.name,
        ",".join(config.recipes),
        config.data_dir,
        extra={"port": port, "tls": credentials is not None, "tokens": bool(tokens)},
    )
    print(f"inserve listening on port {port}", flush=True)
    if metrics.port is not None:
        print(f"inserve metrics on port {metrics.port}", flush=True)

    await stopping.wait()
    grace = config.limits.shutdown_grace_s
    log.info("stopping: no new calls; draining calls in flight (up to %.0f s)", grace)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.stop(grace)
    await loop.shutdown_default_executor()  # video indexing threads: cancelled with their calls, they end soon
    executor.shutdown(wait=True)
    core.close()  # runs what the batcher holds, then snapshots the graphs
    metrics.close()
    log.info("stopped cleanly")
