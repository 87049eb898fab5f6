"""Prometheus metrics: calls, errors and latency by RPC (an interceptor), and the state of the batcher and the
index read at scrape time (a collector), served over HTTP on their own port when configured.

Every RPC also leaves one structured log line (`rpc done`, with method, code, seconds and peer as fields),
which the JSON log format prints as keys.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Iterator
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from inserve.server.config import OpsConfig
from inserve.server.grpc.interceptors import around
from inserve.server.instance_search import InstanceSearch

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, float("inf"))


def split_method(method: str) -> tuple[str, str]:
    """'/inserve.v1.InstanceSearch/Search' -> ('inserve.v1.InstanceSearch', 'Search')."""
    service, _, name = method.lstrip("/").rpartition("/")
    return service, name


def status_code(context: grpc.aio.ServicerContext, error: BaseException | None) -> grpc.StatusCode:
    """How a call ended: the code it aborted or finished with, CANCELLED, or UNKNOWN for an uncaught error.
    A streaming handler whose caller went away while it waited to send is closed with GeneratorExit."""
    if isinstance(error, (asyncio.CancelledError, GeneratorExit)):
        return grpc.StatusCode.CANCELLED
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    return grpc.StatusCode.OK if error is None else grpc.StatusCode.UNKNOWN


class RpcMetrics(grpc.aio.ServerInterceptor):
    """Counts, times and logs every call; the outermost interceptor, so refused calls are counted too."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["service", "method"]
        self.started = Counter("inserve_requests", "Calls started", labels, registry=registry)
        self.handled = Counter(
            "inserve_requests_handled", "Calls ended, by status code", [*labels, "code"], registry=registry
        )
        self.errors = Counter(
            "inserve_errors", "Calls ended with a status other than OK", [*labels, "code"], registry=registry
        )
        self.in_flight = Gauge("inserve_requests_in_flight", "Calls being served", labels, registry=registry)
        self.latency = Histogram(
            "inserve_request_seconds",
            "Call duration, streams whole",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )

    async def intercept_service(self, continuation, handler_call_details: grpc.HandlerCallDetails):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        service, method = split_method(handler_call_details.method)

        def enter(context: grpc.aio.ServicerContext) -> tuple[float, str]:
            """The start time, and the peer read while the call is alive: grpc_call_get_peer after the
            transport of a cancelled call is gone reads freed memory and kills the server (grpc/grpc#29069)."""
            self.started.labels(service, method).inc()
            self.in_flight.labels(service, method).inc()
            return time.monotonic(), context.peer()

        def leave(state: tuple[float, str], context: grpc.aio.ServicerContext, error: BaseException | None) -> None:
            started, peer = state
            seconds = time.monotonic() - started
            code = status_code(context, error).name
            self.in_flight.labels(service, method).dec()
            self.latency.labels(service, method).observe(seconds)
            self.handled.labels(service, method, code).inc()
            if code != "OK":
                self.errors.labels(service, method, code).inc()
            level = logging.ERROR if code in ("UNKNOWN", "INTERNAL") else logging.INFO
            log.log(
                level,
                "rpc done",
                extra={
                    "rpc": f"{service}/{method}",
                    "code": code,
                    "seconds": round(seconds, 6),
                    "peer": peer,
                },
                exc_info=error if code == "UNKNOWN" and not isinstance(error, asyncio.CancelledError) else None,
            )

        return around(handler, enter, leave)


class ServiceCollector(Collector):
    """Batch sizes, queue depth and the index's vectors and whitening versions, read when scraped."""

    def __init__(self, core: InstanceSearch) -> None:
        self.core = core

    def collect(self) -> Iterator[Metric]:
        batcher = self.core.batcher
        depth = GaugeMetricFamily("inserve_queue_depth", "Images waiting in the batcher's queue")
        depth.add_metric([], batcher.depth)
        yield depth
        limit = GaugeMetricFamily("inserve_queue_limit", "Images the batcher's queue holds at most")
        limit.add_metric([], batcher.config.queue_depth)
        yield limit
        yield batch_size_histogram(dict(batcher.batch_sizes), batcher.config.max_batch)
        images = GaugeMetricFamily("inserve_images", "Images (keyframes included) in the index")
        images.add_metric([], self.core.index.count_images())
        yield images
        vectors = GaugeMetricFamily("inserve_index_vectors", "Vectors per index", labels=["recipe", "kind"])
        whitening = GaugeMetricFamily(
            "inserve_whitening_version", "PCA-whitening version per index (0 = none yet)", labels=["recipe", "kind"]
        )
        for space in self.core.index.stats():
            vectors.add_metric([space.recipe, space.kind], space.vectors)
            whitening.add_metric([space.recipe, space.kind], space.whitening_version)
        yield vectors
        yield whitening
        buckets, total = self.core.live_latency.snapshot()
        yield HistogramMetricFamily(
            "inserve_live_keyframe_seconds",
            "Live stream keyframes: seconds from the frame's arrival to its commit (searchable)",
            buckets=[("+Inf" if math.isinf(bound) else str(bound), count) for bound, count in buckets],
            sum_value=total,
        )


def batch_size_histogram(counts: dict[int, int], max_batch: int) -> HistogramMetricFamily:
    """The batcher's {batch size: batches} as a histogram with a bucket per power of two up to max_batch."""
    bounds = sorted({2**i for i in range(max_batch.bit_length()) if 2**i < max_batch} | {max_batch})
    buckets = [(str(bound), sum(n for size, n in counts.items() if size <= bound)) for bound in bounds]
    buckets.append(("+Inf", sum(counts.values())))
    total = sum(size * n for size, n in counts.items())
    return HistogramMetricFamily("inserve_batch_size", "Images per network run", buckets=buckets, sum_value=total)


class MetricsEndpoint:
    """The registry of one server and, when a port is configured, the HTTP endpoint Prometheus scrapes."""

    def __init__(self, config: OpsConfig, core: InstanceSearch) -> None:
        self.registry = CollectorRegistry()
        self.interceptor = RpcMetrics(self.registry)
        self.registry.register(ServiceCollector(core))
        self._http: WSGIServer | None = None
        self.port: int | None = None
        if config.metrics_port is not None:
            self._http, _ = start_http_server(config.metrics_port, config.metrics_host, self.registry)
            self.port = self._http.server_port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
