"""A scheduler with stand-in stage-0 workers, in process: the real SchedulerServicer over
gRPC, and a fake Worker service that answers FormGroup / DissolveGroup as told."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from dataclasses import dataclass

import grpc

from protos import group_pb2, scheduler_pb2, scheduler_pb2_grpc, worker_pb2_grpc
from services.common.convert import instance_spec_to_proto
from services.common.grpc_client import aio_channel
from services.common.grpc_server import GrpcServer
from services.scheduler.config import SchedulerConfig
from services.scheduler.registry import InstanceRegistry
from services.scheduler.servicer import SchedulerServicer
from tests.unit.scheduler.test_groups import spec

TIMEOUT_S = 5.0


class FakeWorker(worker_pb2_grpc.WorkerServicer):
    """Answers FormGroup with the planned group, SERVING, and these figures (or fails
    with `error`; or waits for `release` first)."""

    def __init__(self) -> None:
        self.form_requests: list[group_pb2.FormGroupRequest] = []
        self.dissolve_requests: list[group_pb2.DissolveGroupRequest] = []
        self.error: tuple[grpc.StatusCode, str] | None = None
        self.release: asyncio.Event | None = None
        self.num_group_blocks = 330
        self.num_blocks_before = 200
        self.freed_weight_bytes = 6 * 2**20

    async def _gate(self, context) -> None:
        if self.release is not None:
            await self.release.wait()
        if self.error is not None:
            await context.abort(*self.error)

    async def FormGroup(self, request, context):
        self.form_requests.append(request)
        await self._gate(context)
        group = group_pb2.GroupState()
        group.CopyFrom(request.group)
        group.status = group_pb2.GROUP_STATUS_SERVING
        group.num_group_blocks = self.num_group_blocks
        group.num_blocks_before = self.num_blocks_before
        group.freed_weight_bytes = self.freed_weight_bytes
        return group_pb2.FormGroupResponse(group=group, num_exchanging_requests=2, drop_ms=12.5)

    async def DissolveGroup(self, request, context):
        self.dissolve_requests.append(request)
        await self._gate(context)
        return group_pb2.DissolveGroupResponse(
            num_requests_moved=3, num_preempted=1, restore_ms=40.25
        )


@dataclass
class Mesh:
    """The scheduler (stub, servicer, address) and the fake worker every instance uses."""

    stub: scheduler_pb2_grpc.SchedulerStub
    servicer: SchedulerServicer
    scheduler_address: str
    worker: FakeWorker
    worker_address: str

    async def register(self, *instance_ids: str, **changes) -> None:
        for instance_id in instance_ids:
            info = dataclasses.replace(
                spec(instance_id), **{"address": self.worker_address, **changes}
            )
            await self.stub.RegisterInstance(
                scheduler_pb2.RegisterInstanceRequest(info=instance_spec_to_proto(info)),
                timeout=TIMEOUT_S,
            )


@contextlib.asynccontextmanager
async def scheduler_and_worker(group_timeout_s: float = TIMEOUT_S):
    worker = FakeWorker()
    worker_server = GrpcServer("worker", "127.0.0.1:0", grace_s=0)
    worker_pb2_grpc.add_WorkerServicer_to_server(worker, worker_server.server)
    await worker_server.start(["llmesh.v1.Worker"])
    config = SchedulerConfig(bind="127.0.0.1:0", group_timeout_s=group_timeout_s)
    servicer = SchedulerServicer(config, InstanceRegistry(lease_s=config.lease_s))
    server = GrpcServer("scheduler", config.bind, grace_s=0)
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(servicer, server.server)
    await server.start(["llmesh.v1.Scheduler"])
    channel = aio_channel(server.address)
    try:
        yield Mesh(
            scheduler_pb2_grpc.SchedulerStub(channel),
            servicer,
            server.address,
            worker,
            worker_server.address,
        )
    finally:
        if worker.release is not None:
            worker.release.set()
        await channel.close()
        await server.stop()
        await worker_server.stop()
