"""services.common.interceptors: errors become the right status, trace context flows."""

from __future__ import annotations

import grpc
import pytest

from protos import gateway_pb2, gateway_pb2_grpc
from services.common.errors import NotFoundError, ResourceExhaustedError
from services.common.grpc_client import aio_channel, check_health
from services.common.grpc_server import GrpcServer


class Failing(gateway_pb2_grpc.GatewayServicer):
    async def Abort(self, request, context):
        if request.request_id == "missing":
            raise NotFoundError("request_id 'missing' is not in flight")
        if request.request_id == "full":
            raise ResourceExhaustedError("mesh full")
        if request.request_id == "bad":
            raise ValueError("request_id='bad' is bad")
        raise RuntimeError("bug")

    async def Generate(self, request, context):
        yield gateway_pb2.GenerateChunk(request_id="x")
        raise ValueError("sampling.top_p=2 must be in (0, 1]")


@pytest.fixture
async def stub():
    server = GrpcServer("test", "127.0.0.1:0", grace_s=0)
    gateway_pb2_grpc.add_GatewayServicer_to_server(Failing(), server.server)
    await server.start(["llmesh.v1.Gateway"])
    assert await check_health(server.address) is False  # NOT_SERVING until told
    await server.set_serving()
    assert await check_health(server.address, "llmesh.v1.Gateway") is True
    channel = aio_channel(server.address)
    yield gateway_pb2_grpc.GatewayStub(channel)
    await channel.close()
    await server.stop()


@pytest.mark.parametrize(
    ("request_id", "code", "details"),
    [
        ("missing", grpc.StatusCode.NOT_FOUND, "request_id 'missing' is not in flight"),
        ("full", grpc.StatusCode.RESOURCE_EXHAUSTED, "mesh full"),
        ("bad", grpc.StatusCode.INVALID_ARGUMENT, "request_id='bad' is bad"),
        ("other", grpc.StatusCode.INTERNAL, "internal error: RuntimeError: bug"),
    ],
)
async def test_exceptions_map_to_status_codes(stub, request_id, code, details):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Abort(gateway_pb2.AbortRequest(request_id=request_id), timeout=5)
    assert info.value.code() == code
    assert details in info.value.details()


async def test_streams_map_errors_after_the_first_message(stub):
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for chunk in stub.Generate(gateway_pb2.GenerateRequest(), timeout=5):
            received.append(chunk.request_id)
    assert received == ["x"]
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sampling.top_p=2" in info.value.details()
