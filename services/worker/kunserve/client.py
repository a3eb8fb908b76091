"""Stage 0's view of a member: the same calls whether the member is another worker
(gRPC, `GrpcMember`) or stage 0 itself (`GroupMembership`, called in-process).

    prepare_join(group) -> PrepareReply
    join_group(group, block_offset, epoch) -> JoinReply
    exchange(plan) -> None
    leave_group(group_id, plan, requests) -> int      restored weight bytes
    abort_group(group_id, reason) -> None

and a member's view of stage 0: `exchange_done(group_id, request_id, stage, error)`.
"""

from __future__ import annotations

from protos import group_pb2, worker_pb2_grpc
from services.common.convert_groups import exchange_to_proto, group_to_proto
from services.common.groups import ExchangePlan, GroupSpec
from services.common.grpc_client import aio_channel
from services.worker.kunserve.types import HandedRequest, JoinReply, PrepareReply
from services.worker.migration.grpc_client import handoff_from_proto, handoff_to_proto


def handed_to_proto(request: HandedRequest) -> group_pb2.GroupRequest:
    return group_pb2.GroupRequest(
        state=handoff_to_proto(request.handoff),
        block_ids=list(request.block_ids),
        group_block_ids=list(request.group_block_ids),
    )


def handed_from_proto(message: group_pb2.GroupRequest) -> HandedRequest:
    """Raises ValueError naming the field for a malformed request."""
    if message.group_block_ids and len(message.group_block_ids) != len(message.block_ids):
        raise ValueError("requests[].group_block_ids and block_ids differ in length")
    return HandedRequest(
        handoff_from_proto(message.state),
        tuple(message.block_ids),
        tuple(message.group_block_ids),
    )


class GrpcMember:
    """Another worker of the group, over its Worker service (deadlines on every call)."""

    def __init__(self, address: str, timeout_s: float) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self.channel = aio_channel(address)
        self._stub = worker_pb2_grpc.WorkerStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def prepare_join(self, group: GroupSpec) -> PrepareReply:
        reply = await self._stub.PrepareJoin(
            group_pb2.PrepareJoinRequest(group=group_to_proto(group)), timeout=self.timeout_s
        )
        return PrepareReply(
            reply.accepted, reply.reason, reply.num_blocks, reply.num_group_blocks_possible
        )

    async def join_group(self, group: GroupSpec, block_offset: int, epoch: str) -> JoinReply:
        reply = await self._stub.JoinGroup(
            group_pb2.JoinGroupRequest(
                group=group_to_proto(group), block_offset=block_offset, epoch=epoch
            ),
            timeout=self.timeout_s,
        )
        return JoinReply(
            tuple(handed_from_proto(r) for r in reply.requests), reply.freed_weight_bytes
        )

    async def exchange(self, plan: ExchangePlan) -> None:
        await self._stub.Exchange(exchange_to_proto(plan), timeout=self.timeout_s)

    async def exchange_done(self, group_id: str, request_id: str, stage: int, error: str) -> None:
        await self._stub.ExchangeDone(
            group_pb2.ExchangeDoneRequest(
                group_id=group_id, request_id=request_id, stage=stage, error=error
            ),
            timeout=self.timeout_s,
        )

    async def leave_group(
        self, group_id: str, plan: ExchangePlan, requests: tuple[HandedRequest, ...]
    ) -> int:
        reply = await self._stub.LeaveGroup(
            group_pb2.LeaveGroupRequest(
                group_id=group_id,
                exchange=exchange_to_proto(plan),
                requests=[handed_to_proto(r) for r in requests],
            ),
            timeout=self.timeout_s,
        )
        return reply.restored_weight_bytes

    async def abort_group(self, group_id: str, reason: str) -> None:
        await self._stub.AbortGroup(
            group_pb2.AbortGroupRequest(group_id=group_id, reason=reason), timeout=self.timeout_s
        )
