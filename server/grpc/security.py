"""Who may call: TLS server credentials (optionally demanding client certificates) and bearer tokens.

Tokens travel as call metadata `authorization: Bearer <token>`; a call without an accepted token ends with
UNAUTHENTICATED before its method runs or reads a request, so it does nothing. The health service stays
open, so load balancers and orchestrators can probe without a token.
"""

from __future__ import annotations

import hmac
import logging
import ssl
from pathlib import Path

import grpc

from inserve.server.config import SecurityConfig
from inserve.server.errors import SecurityError
from inserve.server.grpc.interceptors import refusing

log = logging.getLogger(__name__)

OPEN_SERVICES = ("/grpc.health.v1.Health/",)  # method prefixes served without a token
BEARER = "bearer "


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SecurityError(f"cannot read the {what} {path}: {exc.strerror or exc}") from exc


def server_credentials(config: SecurityConfig) -> grpc.ServerCredentials | None:
    """TLS credentials when a certificate is configured (None = plaintext)."""
    if (config.tls_cert is None) != (config.tls_key is None):
        raise SecurityError("TLS needs both a certificate and its private key")
    if config.tls_cert is None:
        if config.tls_client_ca is not None:
            raise SecurityError("client certificates need TLS: give the server a certificate and key too")
        return None
    key, chain = _read(config.tls_key, "TLS key"), _read(config.tls_cert, "TLS certificate")
    check_key_pair(config.tls_cert, config.tls_key)
    client_ca = None if config.tls_client_ca is None else _read(config.tls_client_ca, "client CA bundle")
    return grpc.ssl_server_credentials([(key, chain)], root_certificates=client_ca, require_client_auth=bool(client_ca))


def check_key_pair(cert: Path, key: Path) -> None:
    """Refuse a certificate and key that do not belong together (or are not PEM) here: gRPC only finds out when
    it binds, after the models have loaded, and then says "Failed to bind"."""
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key, password=b"")
    except ssl.SSLError as exc:  # an encrypted key fails too: gRPC takes no password
        mismatch = "KEY_VALUES_MISMATCH" in str(exc)
        reason = "the key does not match the certificate" if mismatch else "not a PEM certificate and unencrypted key"
        raise SecurityError(f"cannot use the TLS certificate {cert} with the key {key}: {reason}") from exc


def load_tokens(path: Path) -> tuple[str, ...]:
    """Accepted tokens: one a line, blank lines and `#` comments skipped."""
    lines = _read(path, "token file").decode("utf-8", errors="strict").splitlines()
    tokens = tuple(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))
    if not tokens:
        raise SecurityError(f"the token file {path} holds no token")
    return tokens


def bearer_token(metadata: tuple[tuple[str, str | bytes], ...] | None) -> str | None:
    """The token of an `authorization: Bearer <token>` entry, if any."""
    for key, value in metadata or ():
        if key.lower() == "authorization" and isinstance(value, str) and value[: len(BEARER)].lower() == BEARER:
            return value[len(BEARER) :].strip()
    return None


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Lets a call through only with one of the accepted tokens (constant-time comparison)."""

    def __init__(self, tokens: tuple[str, ...], open_services: tuple[str, ...] = OPEN_SERVICES) -> None:
        self._tokens = [token.encode() for token in tokens]
        self._open = open_services

    def accepts(self, token: str | None) -> bool:
        if token is None:
            return False
        given = token.encode()
        matches = [hmac.compare_digest(given, accepted) for accepted in self._tokens]  # all compared: no early exit
        return any(matches)

    async def intercept_service(self, continuation, handler_call_details: grpc.HandlerCallDetails):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(self._open):
            return handler
        token = bearer_token(handler_call_details.invocation_metadata)
        if self.accepts(token):
            return handler
        reason = "missing bearer token" if token is None else "invalid bearer token"
        log.warning("refused %s: %s", method, reason)
        return refusing(
            handler, grpc.StatusCode.UNAUTHENTICATED, f"{reason}: send metadata 'authorization: Bearer <token>'"
        )
