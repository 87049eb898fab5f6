"""The Python client's options against a real server: gRPC retries a read-only call refused because the server
is full, a client without retries gets the refusal, default deadlines, the retry policy itself and the keepalive
of its channels."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from photos import encode, photo
from servers import metrics_port, running_server, scrape

from inserve.clients.channels import RETRIED_METHODS, SERVICE, ChannelSecurity, channel_options, service_config
from inserve.clients.client import DEFAULT_TIMEOUT_S, InstanceSearchClient
from inserve.server.config import ServerConfig
from inserve.server.grpc.app import server_options
from inserve.v1 import inserve_pb2 as pb
from inserve.v1 import inserve_pb2_grpc as pb_grpc

FLAGS = ("--recipe", "gem", "--max-concurrent-rpcs", "1", "--metrics-port", "0")  # one call at a time


def held(release: threading.Event) -> Iterator[pb.IndexImageRequest]:
    release.wait(60)
    yield from ()


def refusals(port: int, method: str) -> float:
    labels = (("code", "RESOURCE_EXHAUSTED"), ("method", method), ("service", SERVICE))
    return scrape(port).get(("inserve_requests_handled_total", labels), 0.0)


def test_a_search_refused_while_the_server_is_full_is_retried_and_answered(models_dir: Path, tmp_path: Path) -> None:
    with running_server(models_dir, tmp_path, *FLAGS) as server:
        port = metrics_port(server)
        image = encode(photo("coffee"))
        with (
            InstanceSearchClient(server.address) as client,
            InstanceSearchClient(server.address, retries=False) as bare,
        ):
            client.wait_ready()
            release = threading.Event()
            holder = pb_grpc.InstanceSearchStub(client.channel).IndexImages(held(release), timeout=60)
            while not refusals(port, "GetStats"):  # the holder has the only slot once stats are refused
                with pytest.raises(grpc.RpcError):
                    bare.stats()
            with pytest.raises(grpc.RpcError) as refused:
                bare.search(image)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

            answered: list = []
            searching = threading.Thread(target=lambda: answered.append(client.search(image)))
            searching.start()
            before = refusals(port, "Search")
            while refusals(port, "Search") == before:  # its first attempt is refused...
                time.sleep(0.01)
            release.set()  # ...then the slot comes free, and a later attempt is served
            searching.join(30)
            list(holder)
        assert answered == [[]]  # an empty index: no hits, but an answer


def test_the_retry_policy_covers_read_only_calls_only() -> None:
    (config,) = json.loads(service_config(retries=True))["methodConfig"]
    assert (
        [name["method"] for name in config["name"]] == list(RETRIED_METHODS) == ["Search", "SearchStream", "GetStats"]
    )
    assert config["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE", "RESOURCE_EXHAUSTED"]
    assert json.loads(service_config(retries=False))["methodConfig"] == []
    assert json.loads(service_config(retries=False))["loadBalancingConfig"] == [{"round_robin": {}}]


def test_calls_that_answer_at_once_have_a_deadline_by_default_and_streams_none() -> None:
    with InstanceSearchClient("127.0.0.1:1") as client:
        assert (client.timeout, client.stream_timeout) == (DEFAULT_TIMEOUT_S, None)


def test_the_client_channel_carries_the_keepalive_the_readme_documents(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pings after 30 s of silence on a connection with calls in flight, dropped after 10 s without an answer; the
    server accepts pings every 10 s (more often: GOAWAY too_many_pings) and pings a silent client after 60 s."""
    opened: list[dict] = []
    insecure = grpc.insecure_channel
    monkeypatch.setattr(
        grpc,
        "insecure_channel",
        lambda address, options: opened.append(dict(options)) or insecure(address, options=options),
    )
    with InstanceSearchClient("127.0.0.1:1"):
        pass
    tls = dict(channel_options(ChannelSecurity(tls=True, server_name="inserve.example"), 4 << 20))
    for options in (*opened, tls):
        assert (options["grpc.keepalive_time_ms"], options["grpc.keepalive_timeout_ms"]) == (30_000, 10_000)
        assert options["grpc.http2.max_pings_without_data"] == 0  # a stream silent for hours keeps pinging
        assert "grpc.keepalive_permit_without_calls" not in options  # an idle connection does not
    assert len(opened) == 1
    server = dict(server_options(ServerConfig()))
    assert server["grpc.http2.min_recv_ping_interval_without_data_ms"] == 10_000 <= opened[0]["grpc.keepalive_time_ms"]
    assert server["grpc.keepalive_time_ms"] == 60_000
