"""services.common.interceptors: errors become the right status, trace context flows."""

from __future__ import annotations

import grpc
import pytest

from protos import gateway_pb2, gateway_pb2_grpc
from services.common.errors import NotFoundError, ResourceExhaustedError
from services.common.grpc_client import aio_channel, check_health
from services.common.grpc_server import GrpcServer
from services.common.interceptors import MAX_DETAILS_BYTES


class Failing(gateway_pb2_grpc.GatewayServicer):
    async def Abort(self, request, context):
        if request.request_id == "missing":
            raise NotFoundError("request_id 'missing' is not in flight")
        if request.request_id == "full":
            raise ResourceExhaustedError("mesh full")
        if request.request_id == "bad":
            raise ValueError("request_id='bad' is bad")
        if len(request.request_id) > 1000:
            raise ValueError(f"request_id={request.request_id!r} is too long")
        raise RuntimeError("bug")

    async def Generate(self, request, context):
        yield gateway_pb2.GenerateChunk(request_id="x")
        raise ValueError("sampling.top_p=2 must be in (0, 1]")


class Sink(gateway_pb2_grpc.OutputSinkServicer):
    async def PushOutputs(self, request_iterator, context):
        num_batches = 0
        async for _ in request_iterator:
            num_batches += 1
        return gateway_pb2.PushOutputsAck(num_batches=num_batches)


@pytest.fixture
async def stub():
    server = GrpcServer("test", "127.0.0.1:0", grace_s=0)
    gateway_pb2_grpc.add_GatewayServicer_to_server(Failing(), server.server)
    gateway_pb2_grpc.add_OutputSinkServicer_to_server(Sink(), server.server)
    await server.start(["llmesh.v1.Gateway"])
    assert await check_health(server.address) is False  # NOT_SERVING until told
    await server.set_serving()
    assert await check_health(server.address, "llmesh.v1.Gateway") is True
    channel = aio_channel(server.address)
    stub = gateway_pb2_grpc.GatewayStub(channel)
    stub.raw_channel = channel  # for raw (undecodable) requests
    yield stub
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


def _raw(stub, path: str, kind: str = "unary_unary"):
    return getattr(stub.raw_channel, kind)(
        path, request_serializer=lambda data: data, response_deserializer=lambda data: data
    )


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"\x0a\x05ab", "Wire format was corrupt"),  # a length past the end
        (b"\x0a\x03\xff\xfe\xc0", "String field had bad UTF-8"),
    ],
)
async def test_undecodable_request_is_invalid_argument(stub, payload, reason):
    # gRPC answers UNKNOWN ("Unexpected DecodeError") when the deserializer raises.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _raw(stub, "/llmesh.v1.Gateway/Abort")(payload, timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == (
        "the request is not a valid message: Error parsing message with type "
        f"'llmesh.v1.AbortRequest': {reason}"
    )


async def test_undecodable_message_in_a_client_stream_is_invalid_argument(stub):
    good = gateway_pb2.OutputBatch(instance_id="w").SerializeToString()
    push = _raw(stub, "/llmesh.v1.OutputSink/PushOutputs", "stream_unary")
    assert await push(iter([good, good]), timeout=5) == b"\x08\x02"  # num_batches=2
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await push(iter([good, b"\x0a\x09w"]), timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'llmesh.v1.OutputBatch': Wire format was corrupt" in info.value.details()


async def test_details_echoing_a_huge_id_are_capped(stub):
    # Found by tests/fuzz: 3,000 snowmen in the details overflowed the client's trailer
    # limit (percent-encoded, 9 bytes each): the caller saw RESOURCE_EXHAUSTED instead.
    request_id = "☃" * 3_000
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _raw(stub, "/llmesh.v1.Gateway/Abort")(
            gateway_pb2.AbortRequest(request_id=request_id).SerializeToString(), timeout=5
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = info.value.details()
    assert len(details.encode()) <= MAX_DETAILS_BYTES
    assert details.startswith("request_id='☃☃")
    assert details.endswith("☃☃... (3025 characters in all)")
