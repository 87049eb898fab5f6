"""TLS, client certificates and bearer tokens on the real server, with a PKI made in the test: calls without
the right token get UNAUTHENTICATED and change nothing, health checks stay open, untrusted transports fail,
and the CLI and both clients connect with the right options."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from certificates import Authority
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from media import scenes_video
from photos import encode, photo
from servers import running_server
from skimage import data

from inserve.clients.channels import ChannelSecurity, open_channel
from inserve.clients.client import AsyncInstanceSearchClient, ImageItem, InstanceSearchClient
from inserve.v1 import inserve_pb2 as pb
from inserve.v1 import inserve_pb2_grpc as pb_grpc

TOKEN = "alpha-7f3c1e"
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
MAX_MESSAGE = 64 << 20


class Pki:
    def __init__(self, folder: Path) -> None:
        self.ca = Authority(folder, "inserve-test-ca")
        self.server = self.ca.issue("server", "localhost", server=True)
        self.client = self.ca.issue("client", "test-client", server=False)
        self.stranger = Authority(folder, "other-ca").issue("stranger", "stranger", server=False)
        self.tokens = folder / "tokens"
        self.tokens.write_text(f"# accepted tokens\n{TOKEN}\nbeta-99d2\n")
        self.folder = folder


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_server(models_dir: Path, pki: Pki, tmp_path_factory: pytest.TempPathFactory):
    """TLS and tokens; one image ("kept") indexed."""
    flags = ("--recipe", "gem", "--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key))
    flags += ("--token-file", str(pki.tokens))
    with running_server(models_dir, tmp_path_factory.mktemp("tls-data"), *flags) as server:
        with client_of(server.address, ChannelSecurity(ca=pki.ca.pem, token=TOKEN)) as client:
            client.wait_ready()
            list(client.index_images([ImageItem("kept", encode(photo("chelsea")))]))
        yield server


def client_of(address: str, security: ChannelSecurity) -> InstanceSearchClient:
    return InstanceSearchClient(address, timeout=60, security=security)


def stats_key(client: InstanceSearchClient) -> tuple:
    stats = client.stats()
    return stats.images, stats.videos, sorted((s.recipe, s.kind, s.vectors) for s in stats.indexes)


def calls(stub: pb_grpc.InstanceSearchStub, metadata: tuple, video: bytes) -> dict:
    """One call of every RPC, each of which would change the index or reveal it if let through."""
    image = encode(photo("coffee"))
    options = {"metadata": metadata, "timeout": 60}
    return {
        "IndexImages": lambda: list(
            stub.IndexImages(iter([pb.IndexImageRequest(id="intruder", image=image)]), **options)
        ),
        "Search": lambda: list(stub.Search(pb.SearchRequest(image=image), **options)),
        "SearchStream": lambda: list(
            stub.SearchStream(iter([pb.SearchStreamRequest(query=pb.SearchRequest(image=image))]), **options)
        ),
        "IndexVideo": lambda: list(
            stub.IndexVideo(
                iter(
                    [
                        pb.IndexVideoRequest(header=pb.VideoHeader(video_id="intruder")),
                        pb.IndexVideoRequest(chunk=video),
                    ]
                ),
                **options,
            )
        ),
        "IndexLiveStream": lambda: list(
            stub.IndexLiveStream(
                iter(
                    [
                        pb.LiveStreamRequest(header=pb.LiveStreamHeader(stream_id="intruder")),
                        pb.LiveStreamRequest(frame=pb.LiveFrame(time_s=0.0, image=image)),
                    ]
                ),
                **options,
            )
        ),
        "Delete": lambda: stub.Delete(pb.DeleteRequest(ids=["kept"]), **options),
        "GetStats": lambda: stub.GetStats(pb.GetStatsRequest(), **options),
    }


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return scenes_video(tmp_path_factory.mktemp("video") / "clip.mp4", [data.coffee()], seconds_each=1).read_bytes()


BAD_METADATA = {
    "no-token": (),
    "wrong-token": (("authorization", "Bearer alpha-7f3c1f"),),
    "not-bearer": (("authorization", TOKEN),),
    "empty-bearer": (("authorization", "Bearer "),),
}


@pytest.mark.parametrize("who", sorted(BAD_METADATA))
@pytest.mark.parametrize(
    "rpc", ["IndexImages", "Search", "SearchStream", "IndexVideo", "IndexLiveStream", "Delete", "GetStats"]
)
def test_calls_without_the_right_token_are_refused_and_do_nothing(
    tls_server, pki: Pki, video: bytes, rpc: str, who: str
) -> None:
    security = ChannelSecurity(ca=pki.ca.pem)
    with client_of(tls_server.address, ChannelSecurity(ca=pki.ca.pem, token=TOKEN)) as trusted:
        before = stats_key(trusted)
        with open_channel(tls_server.address, security, MAX_MESSAGE) as channel:
            call = calls(pb_grpc.InstanceSearchStub(channel), BAD_METADATA[who], video)[rpc]
            with pytest.raises(grpc.RpcError) as refused:
                call()
        assert refused.value.code() == UNAUTHENTICATED
        expected = "missing bearer token" if who in ("no-token", "not-bearer") else "invalid bearer token"
        assert expected in refused.value.details()
        assert stats_key(trusted) == before == (1, 0, [("gem", "global", 1)])


def test_the_right_token_is_served_on_every_rpc(tls_server, pki: Pki, video: bytes) -> None:
    with open_channel(tls_server.address, ChannelSecurity(ca=pki.ca.pem), MAX_MESSAGE) as channel:
        results = {
            name: call()
            for name, call in calls(
                pb_grpc.InstanceSearchStub(channel), (("authorization", f"Bearer {TOKEN}"),), video
            ).items()
            if name not in ("IndexImages", "IndexVideo", "IndexLiveStream", "Delete")
        }
    assert results["GetStats"].images == 1
    assert [hit.id for hit in results["Search"]] == ["kept"]
    assert [hit.id for hit in results["SearchStream"][0].hits] == ["kept"]


def test_both_clients_index_search_and_delete_with_a_token(tls_server, pki: Pki) -> None:
    security = ChannelSecurity(ca=pki.ca.pem, token="beta-99d2")  # the second token of the file
    with client_of(tls_server.address, security) as client:
        assert [ack.id for ack in client.index_images([ImageItem("mine", encode(photo("rocket")))])] == ["mine"]
        assert client.search(encode(photo("rocket")), top_k=1)[0].id == "mine"

    async def search_and_delete() -> tuple[str, int]:
        async with AsyncInstanceSearchClient(tls_server.address, timeout=60, security=security) as client:
            hits = await client.search(encode(photo("rocket")), top_k=1)
            return hits[0].id, (await client.delete(["mine"])).deleted

    assert asyncio.run(search_and_delete()) == ("mine", 1)


def test_health_checks_stay_open_and_reflection_does_not(tls_server, pki: Pki) -> None:
    with open_channel(tls_server.address, ChannelSecurity(ca=pki.ca.pem), MAX_MESSAGE) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inserve.v1.InstanceSearch"):
            answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            list(reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        assert refused.value.code() == UNAUTHENTICATED


@pytest.mark.parametrize(
    "security",
    [ChannelSecurity(token=TOKEN), ChannelSecurity(tls=True, token=TOKEN)],
    ids=["plaintext", "tls-untrusted-ca"],
)
def test_a_transport_the_server_does_not_accept_fails(tls_server, security: ChannelSecurity) -> None:
    with (
        InstanceSearchClient(tls_server.address, timeout=5, security=security) as client,
        pytest.raises(grpc.RpcError) as failed,
    ):
        client.stats()
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "inserve.clients.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})})


def test_the_cli_connects_with_tls_and_a_token(tls_server, pki: Pki) -> None:
    port = tls_server.address.rsplit(":", 1)[1]
    tls = ("--server", f"localhost:{port}", "--tls-ca", str(pki.ca.pem))
    done = cli("stats", *tls, "--token-file", str(pki.tokens))
    assert done.returncode == 0 and "images 1" in done.stdout, done.stderr
    from_env = cli("stats", *tls, env={"INSERVE_TOKEN": TOKEN})
    assert from_env.returncode == 0 and "images 1" in from_env.stdout, from_env.stderr
    refused = cli("delete", "kept", *tls)
    assert refused.returncode == 1 and "inserve delete: UNAUTHENTICATED: missing bearer token" in refused.stderr
    assert "Traceback" not in refused.stderr


@pytest.fixture(scope="module")
def mtls_server(models_dir: Path, pki: Pki, tmp_path_factory: pytest.TempPathFactory):
    """TLS that requires a client certificate signed by the test CA; no tokens."""
    flags = ("--recipe", "gem", "--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key))
    flags += ("--tls-client-ca", str(pki.ca.pem))
    with running_server(models_dir, tmp_path_factory.mktemp("mtls-data"), *flags) as server:
        yield server


def test_client_certificates_are_required_when_configured(mtls_server, pki: Pki) -> None:
    signed = ChannelSecurity(ca=pki.ca.pem, cert=pki.client.cert, key=pki.client.key)
    with client_of(mtls_server.address, signed) as client:
        client.wait_ready()
        assert client.stats().images == 0
    stranger = ChannelSecurity(ca=pki.ca.pem, cert=pki.stranger.cert, key=pki.stranger.key)
    for security in (ChannelSecurity(ca=pki.ca.pem), stranger):
        with (
            InstanceSearchClient(mtls_server.address, timeout=5, security=security) as client,
            pytest.raises(grpc.RpcError) as failed,
        ):
            client.stats()
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    port = mtls_server.address.rsplit(":", 1)[1]
    files = ("--tls-ca", str(pki.ca.pem), "--tls-cert", str(pki.client.cert), "--tls-key", str(pki.client.key))
    done = cli("stats", "--server", f"127.0.0.1:{port}", *files)
    assert done.returncode == 0 and "images 0" in done.stdout, done.stderr


def test_tokens_work_without_tls_on_loopback(models_dir: Path, pki: Pki, tmp_path: Path) -> None:
    with running_server(models_dir, tmp_path, "--recipe", "gem", "--token-file", str(pki.tokens)) as server:
        with client_of(server.address, ChannelSecurity(token=TOKEN)) as client:
            client.wait_ready()
            assert client.stats().images == 0
        with client_of(server.address, ChannelSecurity()) as client, pytest.raises(grpc.RpcError) as refused:
            client.stats()
        assert refused.value.code() == UNAUTHENTICATED


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--tls-cert", "server.pem"), "TLS needs both a certificate and its private key"),
        (("--tls-client-ca", "inserve-test-ca.pem"), "client certificates need TLS"),
        (("--tls-cert", "server.pem", "--tls-key", "missing.key"), "cannot read the TLS key"),
        (("--tls-cert", "server.pem", "--tls-key", "client.key"), "the key does not match the certificate"),
        (("--tls-cert", "server.pem", "--tls-key", "tokens"), "cannot use the TLS certificate"),
        (("--token-file", "missing-tokens"), "cannot read the token file"),
        (("--token-file", "empty-tokens"), "holds no token"),
    ],
)
def test_unusable_security_settings_stop_the_server_before_it_starts(
    pki: Pki, tmp_path: Path, flags: tuple[str, ...], message: str
) -> None:
    (pki.folder / "empty-tokens").write_text("# none yet\n\n")
    paths = [str(pki.folder / flag) if not flag.startswith("--") else flag for flag in flags]
    done = cli("serve", "--data-dir", str(tmp_path), "--models", str(tmp_path / "no-models"), *paths)
    assert done.returncode == 2 and message in done.stderr, done.stderr


def test_the_server_binds_loopback_by_default() -> None:
    from inserve.clients.cli import build_parser

    assert build_parser().parse_args(["serve"]).host == "localhost"


@pytest.mark.parametrize("guarded", [False, True], ids=["plaintext-open", "tokens"])
def test_binding_beyond_loopback_without_tls_or_tokens_warns(
    models_dir: Path, tmp_path: Path, pki: Pki, guarded: bool
) -> None:
    flags = ("--recipe", "gem", "--host", "0.0.0.0", *(("--token-file", str(pki.tokens)) if guarded else ()))
    with running_server(models_dir, tmp_path, *flags) as server:
        with InstanceSearchClient(server.address, security=ChannelSecurity(token=TOKEN if guarded else None)) as c:
            c.wait_ready()  # the warning, if any, comes before the line that says the port
        warned = any("in plaintext without tokens" in line for line in server.output)
    assert warned is not guarded
