"""The gateway's client API in-process, up to the point where it would dispatch."""

from __future__ import annotations

import types

import grpc
import pytest

from gateway.api_keys import PUBLIC_SERVICES
from gateway.client import build_request
from gateway.cluster_view import ClusterView, InstanceView
from gateway.servicer import GatewayServicer
from protos import gateway_pb2, gateway_pb2_grpc
from services.common.grpc_server import GrpcServer
from services.common.messages import InstanceSpec
from services.policies import InstanceLoad
from tests.unit.gateway.fakes import idle_generations


@pytest.fixture
async def gateway():
    generations = idle_generations()
    view, sessions = generations.view, generations.sessions
    servicer = GatewayServicer(generations, model_id="tiny")
    server = GrpcServer("gateway", "127.0.0.1:0", grace_s=0, public_services=PUBLIC_SERVICES)
    gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, server.server)
    await server.start(["llmesh.v1.Gateway"])
    channel = grpc.aio.insecure_channel(server.address)
    yield gateway_pb2_grpc.GatewayStub(channel), view, sessions
    await channel.close()
    await server.stop()


def register(view: ClusterView, num_waiting: int = 0) -> None:
    spec = InstanceSpec("w", "addr-w", "tiny", 16, 4, 0, 4, 2048, 258, 257)
    view.update([InstanceView(spec, InstanceLoad("w", 100, 0, 0, num_waiting))])


async def status_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value.code(), info.value.details()


async def test_no_instance_yet_is_unavailable(gateway):
    stub, _, _ = gateway
    code, details = await status_of(stub.GenerateUnary(build_request("hi"), timeout=5))
    assert (code, details) == (
        grpc.StatusCode.UNAVAILABLE,
        "no instance has registered yet; retry shortly",
    )
    info = await stub.GetModelInfo(gateway_pb2.GetModelInfoRequest(), timeout=5)
    assert (info.model_id, info.num_instances) == ("tiny", 0)


async def test_admission_control_answers_resource_exhausted(gateway):
    stub, view, sessions = gateway
    register(view)
    sessions.add(types.SimpleNamespace(request_id="busy"))  # one request in flight = the limit
    code, details = await status_of(stub.GenerateUnary(build_request("hi"), timeout=5))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_inflight_requests=1" in details
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.GenerateUnary(build_request("hi"), timeout=5)
    assert tuple(info.value.trailing_metadata()) == (("retry-after-ms", "1000"),)

    sessions._sessions.clear()
    register(view, num_waiting=8)
    code, details = await status_of(stub.GenerateUnary(build_request("hi"), timeout=5))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_waiting_per_instance" in details


async def test_validation_comes_first_and_names_the_field(gateway):
    stub, view, _ = gateway
    register(view)
    code, details = await status_of(stub.GenerateUnary(build_request("hi", top_p=1.5), timeout=5))
    assert (code, details) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "sampling.top_p=1.5 must be in (0, 1]",
    )
    info = await stub.GetModelInfo(gateway_pb2.GetModelInfoRequest(), timeout=5)
    assert (info.vocab_size, info.max_model_len, info.eos_token_id, info.num_instances) == (
        258,
        2048,
        257,
        1,
    )
