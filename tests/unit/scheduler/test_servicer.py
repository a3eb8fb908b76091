"""The scheduler's gRPC API in-process: registration, load stream, dispatch, cluster state."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from protos import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from services.common.config import ConfigError
from services.common.convert import instance_spec_to_proto
from services.common.grpc_client import aio_channel
from services.common.grpc_server import GrpcServer
from services.common.messages import InstanceSpec
from services.scheduler.config import SchedulerConfig
from services.scheduler.registry import InstanceRegistry
from services.scheduler.servicer import SchedulerServicer

TIMEOUT_S = 5.0


@pytest.fixture
async def scheduler():
    config = SchedulerConfig(bind="127.0.0.1:0")
    registry = InstanceRegistry(lease_s=config.lease_s)
    server = GrpcServer("scheduler", config.bind, grace_s=0)
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(
        SchedulerServicer(config, registry), server.server
    )
    await server.start(["llmesh.v1.Scheduler"])
    channel = aio_channel(server.address)
    yield scheduler_pb2_grpc.SchedulerStub(channel), registry
    await channel.close()
    await server.stop()


def info(instance_id: str) -> common_pb2.InstanceInfo:
    return instance_spec_to_proto(
        InstanceSpec(instance_id, f"addr-{instance_id}", "tiny", 16, 4, 0, 4, 2048, 258, 257)
    )


def report(instance_id: str, seq: int, used: int, running: int) -> common_pb2.LoadReport:
    return common_pb2.LoadReport(
        instance_id=instance_id,
        seq=seq,
        num_running=running,
        num_total_blocks=100,
        num_used_blocks=used,
        virtual_usage=used,
        freeness=(100 - used) / max(running, 1),
    )


async def stream_one_report(stub, registry, load: common_pb2.LoadReport) -> None:
    queue: asyncio.Queue = asyncio.Queue()
    queue.put_nowait(load)

    async def reports():
        yield await queue.get()
        await asyncio.sleep(3600)  # keep the stream open

    call = stub.StreamLoad(reports())
    for _ in range(200):
        record = registry.get(load.instance_id)
        if record is not None and record.report.seq == load.seq:
            break
        await asyncio.sleep(0.01)
    call.cancel()
    assert registry.get(load.instance_id).report.seq == load.seq


async def test_dispatch_goes_to_the_freest_instance_and_respects_exclusions(scheduler):
    stub, registry = scheduler
    for instance_id in ("a", "b"):
        reply = await stub.RegisterInstance(
            scheduler_pb2.RegisterInstanceRequest(info=info(instance_id)), timeout=TIMEOUT_S
        )
        assert (reply.lease_ms, reply.report_interval_ms) == (3000, 50)
    await stream_one_report(stub, registry, report("a", 1, used=80, running=4))
    await stream_one_report(stub, registry, report("b", 1, used=20, running=4))

    chosen = await stub.Dispatch(
        scheduler_pb2.DispatchRequest(request_id="r1", num_prompt_tokens=16), timeout=TIMEOUT_S
    )
    assert (chosen.instance_id, chosen.address) == ("b", "addr-b")
    chosen = await stub.Dispatch(
        scheduler_pb2.DispatchRequest(
            request_id="r2", num_prompt_tokens=16, exclude_instance_ids=["b"]
        ),
        timeout=TIMEOUT_S,
    )
    assert chosen.instance_id == "a"
    with pytest.raises(grpc.aio.AioRpcError) as info_:
        await stub.Dispatch(
            scheduler_pb2.DispatchRequest(request_id="r3", exclude_instance_ids=["a", "b"]),
            timeout=TIMEOUT_S,
        )
    assert info_.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "no instance can take request 'r3'" in info_.value.details()

    state = await stub.GetClusterState(scheduler_pb2.GetClusterStateRequest(), timeout=TIMEOUT_S)
    assert [(i.info.instance_id, i.load.num_used_blocks) for i in state.instances] == [
        ("a", 80),
        ("b", 20),
    ]
    assert state.dispatch_policy == "freest"


async def test_a_reported_load_takes_the_block_size_of_the_registration(scheduler):
    stub, registry = scheduler
    spec = InstanceSpec("a", "addr-a", "tiny", 32, 4, 0, 4, 2048, 258, 257)
    await stub.RegisterInstance(
        scheduler_pb2.RegisterInstanceRequest(info=instance_spec_to_proto(spec)), timeout=TIMEOUT_S
    )
    await stream_one_report(stub, registry, report("a", 1, used=10, running=1))
    assert registry.get("a").report.load.block_size == 32
    assert [load.block_size for load in registry.loads()] == [32]


async def test_load_stream_of_an_unregistered_instance_is_not_found(scheduler):
    stub, _ = scheduler

    async def reports():
        yield report("ghost", 1, used=0, running=0)

    with pytest.raises(grpc.aio.AioRpcError) as info_:
        async for _ in stub.StreamLoad(reports(), timeout=TIMEOUT_S):
            pass
    assert info_.value.code() == grpc.StatusCode.NOT_FOUND
    assert "instance_id 'ghost' is not registered" in info_.value.details()


async def test_bad_registration_and_deregistration(scheduler):
    stub, registry = scheduler
    with pytest.raises(grpc.aio.AioRpcError) as info_:
        await stub.RegisterInstance(
            scheduler_pb2.RegisterInstanceRequest(
                info=common_pb2.InstanceInfo(address="x:1", block_size=16)
            ),
            timeout=TIMEOUT_S,
        )
    assert info_.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "info.instance_id" in info_.value.details()
    await stub.RegisterInstance(
        scheduler_pb2.RegisterInstanceRequest(info=info("a")), timeout=TIMEOUT_S
    )
    await stub.DeregisterInstance(
        scheduler_pb2.DeregisterInstanceRequest(instance_id="a"), timeout=TIMEOUT_S
    )
    assert len(registry) == 0


def test_config_names_the_bad_value():
    with pytest.raises(ConfigError, match="dispatch_policy='nope'"):
        SchedulerConfig(dispatch_policy="nope")
    with pytest.raises(
        ConfigError, match="lease_s=0.1 must be at least 4 x report_interval_s=0.05"
    ):
        SchedulerConfig(lease_s=0.1)
    with pytest.raises(ConfigError, match="migration_policy='nope'"):
        SchedulerConfig(migration_policy="nope")
    with pytest.raises(
        ConfigError,
        match="^scaling settings: scale_up_freeness=50.0 must be < scale_down_freeness",
    ):
        SchedulerConfig(scale_up_freeness=50.0, scale_down_freeness=20.0)
    with pytest.raises(ConfigError, match="^migration settings: interval_s=0.0 must be > 0"):
        SchedulerConfig(migration_interval_s=0.0)
    with pytest.raises(ConfigError, match="worker_args=.*not valid shell syntax"):
        SchedulerConfig(worker_args='--model "unclosed')


async def test_drain_order_goes_down_the_instance_load_stream(scheduler):
    stub, registry = scheduler
    for bad, code, field in (
        ("", grpc.StatusCode.INVALID_ARGUMENT, "instance_id must not be empty"),
        ("ghost", grpc.StatusCode.NOT_FOUND, "instance 'ghost' is not registered"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info_:
            await stub.Drain(
                scheduler_pb2.SchedulerDrainRequest(instance_id=bad, is_terminating=True),
                timeout=TIMEOUT_S,
            )
        assert (info_.value.code(), field in info_.value.details()) == (code, True)
    await stub.RegisterInstance(
        scheduler_pb2.RegisterInstanceRequest(info=info("a")), timeout=TIMEOUT_S
    )
    # No load stream open yet: the order cannot be delivered.
    reply = await stub.Drain(
        scheduler_pb2.SchedulerDrainRequest(instance_id="a", is_terminating=True),
        timeout=TIMEOUT_S,
    )
    assert not reply.sent
    queue: asyncio.Queue = asyncio.Queue()
    queue.put_nowait(report("a", 1, used=0, running=0))

    async def reports():
        while True:
            yield await queue.get()

    call = stub.StreamLoad(reports())
    for _ in range(200):
        if registry.get("a").report.seq == 1:
            break
        await asyncio.sleep(0.01)
    assert registry.get("a").report.seq == 1
    for is_terminating in (True, False):
        reply = await stub.Drain(
            scheduler_pb2.SchedulerDrainRequest(instance_id="a", is_terminating=is_terminating),
            timeout=TIMEOUT_S,
        )
        assert reply.sent
        command = await asyncio.wait_for(call.read(), TIMEOUT_S)
        assert command.WhichOneof("command") == "drain"
        assert command.drain.is_terminating is is_terminating
    call.cancel()
