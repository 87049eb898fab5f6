"""Operations: the Prometheus endpoint scraped after known traffic, and JSON-lines logs with one line per
RPC."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest
from photos import encode, photo
from servers import Server, metrics_port, running_server, scrape

from inserve.clients.client import ImageItem, InstanceSearchClient
from inserve.server.grpc.metrics import batch_size_histogram, status_code

SERVICE = "inserve.v1.InstanceSearch"


def rpc(method: str, **labels: str) -> tuple:
    return tuple(sorted({"service": SERVICE, "method": method, **labels}.items()))


@pytest.fixture(scope="module")
def server(models_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    data_dir = tmp_path_factory.mktemp("ops-data")
    global_flags = ("--log-level", "INFO", "--log-format", "json")
    with running_server(models_dir, data_dir, "--recipe", "gem", "--metrics-port", "0", global_flags=global_flags) as s:
        with InstanceSearchClient(s.address, timeout=120) as client:
            client.wait_ready()
            list(client.index_images(ImageItem(name, encode(photo(name))) for name in ("chelsea", "coffee", "rocket")))
            client.search(encode(photo("chelsea")), top_k=2)
            client.search(encode(photo("coffee")), box=(10, 10, 300, 300))
            with pytest.raises(grpc.RpcError):
                client.search(b"not an image")
            client.delete(["never-indexed"])
            client.stats()
        yield s


def test_metrics_count_calls_errors_latency_batches_and_the_index(server: Server) -> None:
    samples = scrape(metrics_port(server))
    assert samples[("inserve_requests_total", rpc("IndexImages"))] == 1
    assert samples[("inserve_requests_total", rpc("Search"))] == 3
    assert samples[("inserve_requests_handled_total", rpc("Search", code="OK"))] == 2
    assert samples[("inserve_errors_total", rpc("Search", code="INVALID_ARGUMENT"))] == 1
    assert ("inserve_errors_total", rpc("Search", code="OK")) not in samples
    assert samples[("inserve_requests_handled_total", rpc("Delete", code="OK"))] == 1
    assert samples[("inserve_requests_in_flight", rpc("Search"))] == 0
    assert samples[("inserve_request_seconds_count", rpc("Search"))] == 3
    assert 0 < samples[("inserve_request_seconds_sum", rpc("IndexImages"))] < 120
    assert samples[("inserve_request_seconds_bucket", rpc("GetStats", le="+Inf"))] >= 1
    # the batcher: 3 images described and 2 queries, in batches of any size
    assert samples[("inserve_batch_size_sum", ())] == 5
    assert 1 <= samples[("inserve_batch_size_count", ())] <= 5
    assert samples[("inserve_batch_size_bucket", (("le", "+Inf"),))] == samples[("inserve_batch_size_count", ())]
    assert samples[("inserve_queue_depth", ())] == 0 and samples[("inserve_queue_limit", ())] == 64
    # the index
    assert samples[("inserve_images", ())] == 3
    assert samples[("inserve_index_vectors", (("kind", "global"), ("recipe", "gem")))] == 3
    assert samples[("inserve_whitening_version", (("kind", "global"), ("recipe", "gem")))] == 0


def test_logs_are_json_lines_with_one_line_per_rpc(server: Server) -> None:
    lines = [line for line in "".join(server.output).splitlines() if not line.startswith("inserve ")]
    entries = [json.loads(line) for line in lines]  # every log line is one JSON object
    assert all({"time", "level", "logger", "message"} <= entry.keys() for entry in entries)
    calls = [entry for entry in entries if entry["message"] == "rpc done"]
    refused = [entry for entry in calls if entry["code"] == "INVALID_ARGUMENT"]
    assert len(refused) == 1 and refused[0]["rpc"] == f"{SERVICE}/Search"
    assert refused[0]["level"] == "INFO" and refused[0]["peer"].startswith("ipv4:127.0.0.1:")
    assert {entry["rpc"].rsplit("/", 1)[1] for entry in calls} >= {"IndexImages", "Search", "Delete", "GetStats"}
    assert all(isinstance(entry["seconds"], float) for entry in calls)
    started = next(entry for entry in entries if entry["message"].startswith("inserve listening on port"))
    assert started["tls"] is False and started["tokens"] is False


def test_batch_sizes_become_a_cumulative_histogram() -> None:
    family = batch_size_histogram({1: 4, 3: 2, 8: 1}, max_batch=8)
    samples = {(s.name, s.labels.get("le")): s.value for s in family.samples}
    assert samples[("inserve_batch_size_bucket", "1")] == 4
    assert samples[("inserve_batch_size_bucket", "2")] == 4
    assert samples[("inserve_batch_size_bucket", "4")] == 6
    assert samples[("inserve_batch_size_bucket", "8")] == 7
    assert samples[("inserve_batch_size_bucket", "+Inf")] == 7
    assert samples[("inserve_batch_size_count", None)] == 7 and samples[("inserve_batch_size_sum", None)] == 18


class EndedCall:
    """The one thing status_code asks of a servicer context: the code the call was ended with, if any."""

    def __init__(self, code: grpc.StatusCode | None) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode | None:
        return self._code


def test_how_a_call_ended() -> None:
    assert status_code(EndedCall(None), None) == grpc.StatusCode.OK
    assert status_code(EndedCall(grpc.StatusCode.NOT_FOUND), Exception("aborted")) == grpc.StatusCode.NOT_FOUND
    assert status_code(EndedCall(None), ValueError("a bug")) == grpc.StatusCode.UNKNOWN
    # the caller went away: the handler is cancelled, or closed at a `yield` (a streaming response)
    assert status_code(EndedCall(None), asyncio.CancelledError()) == grpc.StatusCode.CANCELLED
    assert status_code(EndedCall(None), GeneratorExit()) == grpc.StatusCode.CANCELLED
