"""Server bootstrap: the gRPC server with health and reflection, graceful stop on SIGTERM / SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from inserve.server.config import ServerConfig
from inserve.server.instance_search import InstanceSearch
from inserve.server.service import InstanceSearchServicer
from inserve.v1 import inserve_pb2 as pb
from inserve.v1 import inserve_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["InstanceSearch"].full_name
GRACE_SECONDS = 30.0


async def serve(config: ServerConfig) -> None:
    """Run until SIGTERM or SIGINT; then stop taking calls, finish those in flight, snapshot, return."""
    core = InstanceSearch(config)
    executor = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="inserve-worker")
    options = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
    ]
    server = grpc.aio.server(options=options)
    pb_grpc.add_InstanceSearchServicer_to_server(InstanceSearchServicer(core, executor), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = server.add_insecure_port(f"{config.host}:{config.port}")
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "inserve listening on port %d (backbone %s, recipes %s, data %s)",
        port,
        core.models.name,
        ",".join(config.recipes),
        config.data_dir,
    )
    print(f"inserve listening on port {port}", flush=True)

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    log.info("stopping: draining calls in flight (up to %.0f s)", GRACE_SECONDS)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.stop(GRACE_SECONDS)
    executor.shutdown(wait=True)
    core.close()
    log.info("stopped cleanly")
