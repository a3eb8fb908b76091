"""services.common.cluster_auth: where the secret comes from, the per-call signature, and
the server interceptor that refuses non-members (UNAUTHENTICATED) but leaves health open."""

from __future__ import annotations

import stat

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import scheduler_pb2, scheduler_pb2_grpc
from services.common import cluster_auth
from services.common.auth_interceptors import aio_metadata_interceptors, cluster_signature
from services.common.cluster_auth import ClusterAuthConfig, read_secret, sign, verify
from services.common.config import ConfigError, load_config
from services.common.grpc_client import aio_channel
from services.common.grpc_server import GrpcServer

SECRET = b"0123456789abcdef0123456789abcdef"
METHOD = "/llmesh.v1.Worker/Submit"


def test_a_signature_holds_for_its_method_its_secret_and_its_window_only():
    value = sign(SECRET, METHOD, now=1_000_000)
    assert verify(SECRET, METHOD, value, now=1_000_000 + 299) == ""
    assert verify(SECRET, "/llmesh.v1.Worker/Abort", value, now=1_000_000) == (
        "wrong cluster credentials"
    )
    assert verify(b"x" * 32, METHOD, value, now=1_000_000) == "wrong cluster credentials"
    assert verify(SECRET, METHOD, value, now=1_000_000 + 301).startswith(
        "cluster credentials expired"
    )
    assert verify(SECRET, METHOD, None) == "no cluster credentials"
    assert verify(SECRET, METHOD, "Bearer abc") == "malformed cluster credentials"
    assert sign(SECRET, METHOD, now=5) != sign(SECRET, METHOD, now=5)  # a fresh nonce each


def test_the_secret_comes_from_the_variable_then_the_file(tmp_path, monkeypatch):
    secret_file = tmp_path / "s"
    secret_file.write_text("  from-the-file-0123456789\n")
    env = {"LLMESH_CLUSTER_SECRET_FILE": str(secret_file)}
    assert read_secret(load_config(ClusterAuthConfig, "CLUSTER", environ=env)) == (
        b"from-the-file-0123456789"
    )
    env["LLMESH_CLUSTER_SECRET"] = "from-the-variable-0123"
    assert read_secret(load_config(ClusterAuthConfig, "CLUSTER", environ=env)) == (
        b"from-the-variable-0123"
    )


def test_no_secret_or_a_short_one_is_a_config_error_saying_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    with pytest.raises(ConfigError) as missing:
        read_secret(ClusterAuthConfig())
    assert str(missing.value).startswith(
        f"no cluster secret: set LLMESH_CLUSTER_SECRET, or put one in "
        f"{tmp_path / 'llmesh' / 'cluster-secret'}"
    )
    assert "./llmesh certs --out DIR" in str(missing.value)
    with pytest.raises(ConfigError, match="has 5 characters; use at least 16"):
        read_secret(ClusterAuthConfig(secret="short"))


def test_ensure_secret_file_creates_it_owner_only_and_keeps_it(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    path = cluster_auth.ensure_secret_file()
    assert path == tmp_path / "llmesh" / "cluster-secret"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    first = path.read_text()
    assert len(first.strip()) == 64
    assert cluster_auth.ensure_secret_file() == path and path.read_text() == first


def test_cluster_tls_needs_all_three_files():
    with pytest.raises(ConfigError, match="cluster TLS needs all of tls_ca, tls_cert and tls_key"):
        ClusterAuthConfig(tls_ca="ca.pem")


@pytest.fixture
async def scheduler_server():
    """A server whose Scheduler.Drain answers sent=True to whoever it lets through."""
    server = GrpcServer("scheduler", "127.0.0.1:0", grace_s=0)

    class DrainOnly(scheduler_pb2_grpc.SchedulerServicer):
        async def Drain(self, request, context):
            return scheduler_pb2.SchedulerDrainResponse(sent=True)

    scheduler_pb2_grpc.add_SchedulerServicer_to_server(DrainOnly(), server.server)
    await server.start(["llmesh.v1.Scheduler"])
    await server.set_serving()
    yield server
    await server.stop()


async def _drain(channel) -> grpc.StatusCode:
    stub = scheduler_pb2_grpc.SchedulerStub(channel)
    try:
        reply = await stub.Drain(scheduler_pb2.SchedulerDrainRequest(), timeout=5)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    assert reply.sent
    return grpc.StatusCode.OK


async def test_the_interceptor_refuses_outsiders_and_serves_members_and_health(scheduler_server):
    address = scheduler_server.address
    async with grpc.aio.insecure_channel(address) as bare:
        assert await _drain(bare) == grpc.StatusCode.UNAUTHENTICATED
        reply = await health_pb2_grpc.HealthStub(bare).Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    async with aio_channel(address) as member:  # this process's (the suite's) secret
        assert await _drain(member) == grpc.StatusCode.OK
    impostor = grpc.aio.insecure_channel(
        address, interceptors=aio_metadata_interceptors(cluster_signature(b"w" * 32))
    )
    async with impostor:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await scheduler_pb2_grpc.SchedulerStub(impostor).Drain(
                scheduler_pb2.SchedulerDrainRequest(), timeout=5
            )
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert refused.value.details() == (
        "/llmesh.v1.Scheduler/Drain: internal RPC: only cluster members may call it: "
        "wrong cluster credentials"
    )
