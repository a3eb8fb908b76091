"""The scheduler's metrics over a real servicer: its view per instance, dispatch
decisions, KunServe operation outcomes and control-loop rounds."""

from __future__ import annotations

import grpc
import pytest

from protos import scheduler_pb2, scheduler_pb2_grpc
from services.common.grpc_client import aio_channel
from services.common.grpc_server import GrpcServer
from services.scheduler.config import SchedulerConfig
from services.scheduler.metrics import SchedulerMetrics
from services.scheduler.registry import InstanceRegistry
from services.scheduler.servicer import SchedulerServicer
from tests.unit.scheduler.test_servicer import TIMEOUT_S, info, report, stream_one_report


@pytest.fixture
async def scheduler():
    config = SchedulerConfig(bind="127.0.0.1:0")
    registry = InstanceRegistry(lease_s=config.lease_s)
    servicer = SchedulerServicer(config, registry)
    server = GrpcServer("scheduler", config.bind, grace_s=0)
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(servicer, server.server)
    await server.start(["llmesh.v1.Scheduler"])
    channel = aio_channel(server.address)
    yield scheduler_pb2_grpc.SchedulerStub(channel), servicer
    await channel.close()
    await server.stop()


async def test_the_cluster_view_and_decisions_are_exported(scheduler):
    stub, servicer = scheduler
    metrics = SchedulerMetrics(servicer)
    value = metrics.registry.get_sample_value
    for instance_id in ("a", "b"):
        await stub.RegisterInstance(
            scheduler_pb2.RegisterInstanceRequest(info=info(instance_id)), timeout=TIMEOUT_S
        )
    await stream_one_report(stub, servicer.registry, report("a", 1, used=80, running=4))
    await stream_one_report(stub, servicer.registry, report("b", 1, used=20, running=4))
    await stub.Dispatch(scheduler_pb2.DispatchRequest(request_id="r1"), timeout=TIMEOUT_S)
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.Dispatch(
            scheduler_pb2.DispatchRequest(request_id="r2", exclude_instance_ids=["a", "b"]),
            timeout=TIMEOUT_S,
        )
    a = {"instance_id": "a", "model_name": "tiny"}
    assert value("llmesh:instances") == 2
    assert value("llmesh:instance_freeness", a) == 5.0
    assert value("llmesh:instance_kv_usage_perc", a) == 0.8
    assert value("llmesh:instance_virtual_usage", {**a, "instance_id": "b"}) == 20
    dispatches = {"policy": "freest"}
    assert value("llmesh:dispatch_decisions_total", {**dispatches, "outcome": "dispatched"}) == 1
    assert value("llmesh:dispatch_decisions_total", {**dispatches, "outcome": "no_candidate"}) == 1
    assert value("llmesh:kunserve_groups") == 0
    assert value("llmesh:kunserve_drops_total", {"outcome": "ok"}) == 0
    servicer.group_control.outcomes["drop", "failed"] += 1
    assert value("llmesh:kunserve_drops_total", {"outcome": "failed"}) == 1
    metrics.on_round("migration", 0.002)
    assert value("llmesh:scheduler_loop_seconds_count", {"loop": "migration"}) == 1
    # A deregistered instance leaves no series behind.
    await stub.DeregisterInstance(
        scheduler_pb2.DeregisterInstanceRequest(instance_id="a"), timeout=TIMEOUT_S
    )
    assert value("llmesh:instance_freeness", a) is None
    assert value("llmesh:instances") == 1
