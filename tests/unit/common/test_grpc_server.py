"""The shared server bootstrap: health transitions, reflection, error mapping, stop."""

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from protos import gateway_pb2, gateway_pb2_grpc
from services.common.grpc_client import aio_channel, check_health
from services.common.grpc_server import GrpcServer
from services.common.tracing import context_to_dict, get_tracer, setup_tracing

SERVICE = "llmesh.v1.Gateway"


class _Gateway(gateway_pb2_grpc.GatewayServicer):
    def __init__(self):
        self.seen_traceparents = []

    async def GetModelInfo(self, request, context):
        self.seen_traceparents.append(context_to_dict().get("traceparent"))
        return gateway_pb2.ModelInfo(model_id="tiny", vocab_size=259)

    async def Abort(self, request, context):
        raise ValueError(f"request_id {request.request_id!r} is unknown")

    async def GenerateUnary(self, request, context):
        raise RuntimeError("boom")


@pytest.fixture
async def server():
    srv = GrpcServer("test", "127.0.0.1:0", grace_s=0.5)
    servicer = _Gateway()
    gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, srv.server)
    await srv.start([SERVICE])
    srv.servicer = servicer
    try:
        yield srv
    finally:
        await srv.stop()


async def test_health_goes_serving_then_not_serving_on_stop(server):
    assert server.port > 0
    assert not await check_health(server.address)
    await server.set_serving()
    assert await check_health(server.address)
    assert await check_health(server.address, SERVICE)
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=1)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    await server.stop()
    assert not await check_health(server.address)


async def test_reflection_lists_the_service(server):
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)

        async def requests():
            yield reflection_pb2.ServerReflectionRequest(list_services="")

        names = []
        async for reply in stub.ServerReflectionInfo(requests(), timeout=2):
            names = [s.name for s in reply.list_services_response.service]
            break
    assert SERVICE in names and "grpc.health.v1.Health" in names


async def test_value_error_maps_to_invalid_argument_and_crash_to_internal(server):
    async with aio_channel(server.address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Abort(gateway_pb2.AbortRequest(request_id="r9"), timeout=2)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details() == "request_id 'r9' is unknown"
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GenerateUnary(gateway_pb2.GenerateRequest(prompt="x"), timeout=2)
        assert err.value.code() == grpc.StatusCode.INTERNAL
        assert "RuntimeError: boom" in err.value.details()


async def test_trace_context_crosses_the_call(server):
    setup_tracing("test")
    tracer = get_tracer("test")
    async with aio_channel(server.address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        with tracer.start_as_current_span("client") as span:
            await stub.GetModelInfo(gateway_pb2.GetModelInfoRequest(), timeout=2)
            trace_id = format(span.get_span_context().trace_id, "032x")
    (traceparent,) = server.servicer.seen_traceparents
    assert traceparent.split("-")[1] == trace_id


async def test_health_list_answers_every_service_status(server):
    # grpcio-health-checking does not implement List: it used to answer INTERNAL.
    await server.set_serving()
    async with grpc.aio.insecure_channel(server.address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).List(
            health_pb2.HealthListRequest(), timeout=2
        )
    statuses = {name: r.status for name, r in reply.statuses.items()}
    assert statuses == {
        "": health_pb2.HealthCheckResponse.SERVING,
        SERVICE: health_pb2.HealthCheckResponse.SERVING,
    }


async def test_unimplemented_method_answers_unimplemented(server):
    # _Gateway leaves Generate to the generated base class, which raises
    # NotImplementedError: UNIMPLEMENTED, not INTERNAL.
    async with aio_channel(server.address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in stub.Generate(gateway_pb2.GenerateRequest(prompt="x"), timeout=2):
                pass
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert err.value.details() == "/llmesh.v1.Gateway/Generate is not implemented"
