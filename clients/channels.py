"""Channels to a server that may demand TLS, client certificates and a bearer token."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc


@dataclass(frozen=True)
class ChannelSecurity:
    """How to reach the server. The default is plaintext without a token (loopback, tests)."""

    tls: bool = False  # implied by any of the three files below
    ca: Path | None = None  # PEM roots that signed the server's certificate (None = the system's roots)
    cert: Path | None = None  # client certificate and key, for servers that require them (mutual TLS)
    key: Path | None = None
    server_name: str | None = None  # the name to check the server's certificate against, when not the host's
    token: str | None = None  # sent as `authorization: Bearer <token>`; use TLS unless on loopback

    @property
    def uses_tls(self) -> bool:
        return self.tls or any(path is not None for path in (self.ca, self.cert, self.key))

    def credentials(self) -> grpc.ChannelCredentials:
        if (self.cert is None) != (self.key is None):
            raise ValueError("a client certificate needs its key, and a key its certificate")
        return grpc.ssl_channel_credentials(
            root_certificates=None if self.ca is None else Path(self.ca).read_bytes(),
            private_key=None if self.key is None else Path(self.key).read_bytes(),
            certificate_chain=None if self.cert is None else Path(self.cert).read_bytes(),
        )

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return () if not self.token else (("authorization", f"Bearer {self.token}"),)


SERVICE = "inserve.v1.InstanceSearch"
# calls that read only, so that trying again cannot do anything twice; Delete is left out (a retried Delete
# whose first attempt did run would report its ids missing), the index calls report ALREADY_EXISTS instead
RETRIED_METHODS = ("Search", "SearchStream", "GetStats")
# gRPC's own retries (service config, gRFC A6): a server that is restarting (UNAVAILABLE) or full
# (RESOURCE_EXHAUSTED) is tried again after 0.1, 0.2, 0.4, 0.8 s (each jittered); a stream only until its
# first answer has come
RETRY_POLICY = {
    "maxAttempts": 5,
    "initialBackoff": "0.1s",
    "maxBackoff": "2s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"],
}
# pings on a connection with calls in flight and nothing sent for 30 s, so that a long stream (IndexVideo,
# a live stream) notices a dead server or a silent NAT drop in 40 s instead of the system's TCP timeout; the
# server accepts them (server/grpc/app.py KEEPALIVE_MIN_PING_INTERVAL_MS)
KEEPALIVE_TIME_MS = 30_000
KEEPALIVE_TIMEOUT_MS = 10_000


def service_config(retries: bool) -> str:
    """Retries as above; and calls spread over every address the target resolves to (`round_robin`), so that
    one client reaches all replicas of a shared store: `dns:///inserve.example:50051` (several A records) or
    `ipv4:10.0.0.1:50051,10.0.0.2:50051`. A replica that goes away drops out; a read retried after
    UNAVAILABLE goes to another."""
    methods = [{"service": SERVICE, "method": method} for method in RETRIED_METHODS]
    config = {
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [{"name": methods, "retryPolicy": RETRY_POLICY}] if retries else [],
    }
    return json.dumps(config)


def channel_options(security: ChannelSecurity, max_message_bytes: int, retries: bool = True) -> list[tuple[str, Any]]:
    options: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.enable_retries", int(retries)),
        ("grpc.service_config", service_config(retries)),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    if security.server_name:
        options.append(("grpc.ssl_target_name_override", security.server_name))
    return options


def open_channel(address: str, security: ChannelSecurity, max_message_bytes: int, retries: bool = True) -> grpc.Channel:
    options = channel_options(security, max_message_bytes, retries)
    if security.uses_tls:
        return grpc.secure_channel(address, security.credentials(), options=options)
    return grpc.insecure_channel(address, options=options)


def open_aio_channel(
    address: str, security: ChannelSecurity, max_message_bytes: int, retries: bool = True
) -> grpc.aio.Channel:
    options = channel_options(security, max_message_bytes, retries)
    if security.uses_tls:
        return grpc.aio.secure_channel(address, security.credentials(), options=options)
    return grpc.aio.insecure_channel(address, options=options)


class WithMetadata:
    """A stub whose every call carries `metadata` (the token); works for blocking and asyncio stubs."""

    def __init__(self, stub: object, metadata: tuple[tuple[str, str], ...]) -> None:
        self._stub = stub
        self._metadata = metadata

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._stub, name)
        return functools.partial(method, metadata=self._metadata) if self._metadata else method
