"""The scheduler's calls to workers: KunServe group orders to a group's stage 0.

Everything else the scheduler tells a worker goes down its load stream; forming and
dissolving a group are unary calls because the caller waits for the outcome. Each call
opens its own channel (drops are rare) and carries a deadline. A failed call becomes
the ServiceError the scheduler answers with:

    worker answered             scheduler answers
    UNAVAILABLE                 UNAVAILABLE (the worker is unreachable)
    DEADLINE_EXCEEDED           DEADLINE_EXCEEDED (no answer within group_timeout_s)
    RESOURCE_EXHAUSTED          RESOURCE_EXHAUSTED
    INVALID_ARGUMENT, NOT_FOUND,
    FAILED_PRECONDITION, ...    FAILED_PRECONDITION (a member refused; the reason follows)
    INTERNAL, UNKNOWN           INTERNAL
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from protos import group_pb2, worker_pb2_grpc
from services.common.convert_groups import group_to_proto
from services.common.errors import (
    DeadlineExceededError,
    FailedPreconditionError,
    ResourceExhaustedError,
    ServiceError,
    UnavailableError,
)
from services.common.groups import GroupMember, GroupSpec
from services.common.grpc_client import aio_channel


@dataclass(frozen=True)
class FormedGroup:
    """Stage 0's answer to FormGroup: the group's figures."""

    num_group_blocks: int
    num_blocks_before: int
    freed_weight_bytes: int
    num_exchanging_requests: int
    drop_ms: float


@dataclass(frozen=True)
class DissolvedGroup:
    """Stage 0's answer to DissolveGroup."""

    num_requests_moved: int
    num_preempted: int
    restore_ms: float


class WorkerClient:
    """Calls Worker.FormGroup / Worker.DissolveGroup with a deadline of `timeout_s`."""

    def __init__(self, timeout_s: float) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s={timeout_s} must be > 0")
        self.timeout_s = timeout_s

    async def form_group(self, group: GroupSpec) -> FormedGroup:
        request = group_pb2.FormGroupRequest(group=group_to_proto(group))
        reply = await self._call("FormGroup", group.leader, request)
        if reply.group.group_id != group.group_id:
            raise ServiceError(
                f"stage 0 {group.leader.instance_id!r} answered FormGroup for group "
                f"{reply.group.group_id!r}, not {group.group_id!r}"
            )
        return FormedGroup(
            num_group_blocks=reply.group.num_group_blocks,
            num_blocks_before=reply.group.num_blocks_before,
            freed_weight_bytes=reply.group.freed_weight_bytes,
            num_exchanging_requests=reply.num_exchanging_requests,
            drop_ms=reply.drop_ms,
        )

    async def dissolve_group(self, group: GroupSpec) -> DissolvedGroup:
        request = group_pb2.DissolveGroupRequest(group_id=group.group_id)
        reply = await self._call("DissolveGroup", group.leader, request)
        return DissolvedGroup(reply.num_requests_moved, reply.num_preempted, reply.restore_ms)

    async def _call(self, rpc: str, leader: GroupMember, request):
        async with aio_channel(leader.address) as channel:
            method = getattr(worker_pb2_grpc.WorkerStub(channel), rpc)
            try:
                return await method(request, timeout=self.timeout_s)
            except grpc.aio.AioRpcError as exc:
                raise self._error(rpc, leader, exc) from exc

    def _error(self, rpc: str, leader: GroupMember, exc: grpc.aio.AioRpcError) -> ServiceError:
        where = f"Worker.{rpc} on stage 0 {leader.instance_id!r} at {leader.address}"
        code = exc.code()
        if code == grpc.StatusCode.UNAVAILABLE:
            return UnavailableError(f"{where}: worker unreachable: {exc.details()}")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return DeadlineExceededError(
                f"{where}: no answer within group_timeout_s={self.timeout_s}"
            )
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return ResourceExhaustedError(f"{where}: {exc.details()}")
        if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
            return ServiceError(f"{where} failed: {code.name}: {exc.details()}")
        return FailedPreconditionError(f"{where} refused: {code.name}: {exc.details()}")
