"""gRPC adapter of a worker: protobuf in, WorkerInstance calls, protobuf out.

The migration RPCs (MigrateOut on the source; PrepareMigration, MigrationStage,
CommitMigration, AbortMigration on the destination) go to services.worker.migration;
the KunServe group RPCs (FormGroup, DissolveGroup on stage 0; PrepareJoin, JoinGroup,
Exchange, ExchangeDone, LeaveGroup, AbortGroup between members) to
services.worker.kunserve.
"""

from __future__ import annotations

from protos import group_pb2, worker_pb2, worker_pb2_grpc
from services.common.convert import (
    finish_reason_to_proto,
    kernels_from_proto,
    load_to_proto,
    migration_mode_from_proto,
    migration_status_to_proto,
    request_from_proto,
)
from services.common.convert_groups import exchange_from_proto, group_from_proto, group_to_proto
from services.common.errors import FailedPreconditionError, UnavailableError
from services.common.logging import bind_context
from services.worker.instance import WorkerInstance
from services.worker.kunserve import GroupMembership
from services.worker.kunserve.client import handed_from_proto, handed_to_proto
from services.worker.migration import (
    CommitOffer,
    MigrationTarget,
    PrepareOffer,
    StageOffer,
)
from services.worker.migration.grpc_client import handoff_from_proto, handoff_to_proto
from services.worker.migration.service import WorkerMigration


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    """Registered before the server starts; `instance` is set once the engine loaded
    (until then every call answers UNAVAILABLE, and health says NOT_SERVING)."""

    def __init__(self) -> None:
        self.instance: WorkerInstance | None = None

    def _ready(self) -> WorkerInstance:
        if self.instance is None:
            raise UnavailableError("the worker is still loading its engine")
        return self.instance

    async def Submit(self, request, context):
        instance = self._ready()
        spec = request_from_proto(request.state)
        with bind_context(request_id=spec.request_id):
            await instance.submit(spec)
        return worker_pb2.SubmitResponse(instance_id=instance.instance_id)

    async def Abort(self, request, context):
        instance = self._ready()
        if not request.request_id:
            raise ValueError("request_id must not be empty")
        aborted = await instance.abort(request.request_id)
        return worker_pb2.WorkerAbortResponse(aborted=aborted)

    async def Rehome(self, request, context):
        instance = self._ready()
        request_id = _required(request.request_id, "request_id")
        owner_address = _required(request.owner_address, "owner_address")
        if ":" not in owner_address:
            raise ValueError(f"owner_address={owner_address[:80]!r} must be host:port")
        if request.next_index < 0:
            raise ValueError(f"next_index={request.next_index} must be >= 0")
        with bind_context(request_id=request_id):
            found = await instance.rehome(request_id, owner_address, request.next_index)
        if found is None:
            return worker_pb2.RehomeResponse(found=False, instance_id=instance.instance_id)
        handoff, finish_reason = found
        return worker_pb2.RehomeResponse(
            found=True,
            state=handoff_to_proto(handoff),
            finish_reason=finish_reason_to_proto(finish_reason),
            instance_id=instance.instance_id,
        )

    async def GetLoad(self, request, context):
        instance = self._ready()
        return load_to_proto(await instance.load(check_integrity=request.check_integrity))

    # ---- live migration ---------------------------------------------------------------

    def _migration(self) -> WorkerMigration:
        migration = self._ready().migration
        if migration is None:
            raise UnavailableError("live migration is not enabled on this worker")
        return migration

    async def MigrateOut(self, request, context):
        migration = self._migration()
        kunserve = self._ready().kunserve
        if kunserve is not None and kunserve.group is not None:
            raise FailedPreconditionError(
                f"instance is in KunServe group {kunserve.group_id}: its requests' KV is "
                "split across the members and does not migrate"
            )
        if not request.dst_instance_id:
            raise ValueError("dst_instance_id must not be empty")
        if not request.dst_address:
            raise ValueError("dst_address must not be empty")
        mode = migration_mode_from_proto(request.mode)
        target = MigrationTarget(
            request.dst_instance_id, request.dst_address, request.dst_transport_address
        )
        if not request.wait:
            migration.migrate_out_soon(target, request.request_id, request.num_requests)
            return worker_pb2.MigrateOutResponse()
        results = await migration.migrate_out(
            target, request.request_id, request.num_requests or 1, mode
        )
        return worker_pb2.MigrateOutResponse(
            results=[
                worker_pb2.MigrationResult(
                    migration_id=r.migration_id,
                    request_id=r.request_id,
                    status=migration_status_to_proto(r.status),
                    reason=r.reason,
                    num_stages=r.num_stages,
                    num_blocks=r.num_blocks,
                    downtime_ms=r.downtime_ms,
                    num_bytes=r.num_bytes,
                    duration_ms=r.duration_ms,
                )
                for r in results
            ]
        )

    async def PrepareMigration(self, request, context):
        reply = await self._migration().destination.prepare(
            PrepareOffer(
                migration_id=_required(request.migration_id, "migration_id"),
                request_id=_required(request.request_id, "request_id"),
                src_instance_id=request.src_instance_id,
                src_transport_address=request.src_transport_address,
                num_blocks=request.num_blocks,
                lease_s=request.lease_ms / 1000,
                num_tokens=request.num_tokens,
                kernels=kernels_from_proto(request.kernels),
                trace_context=dict(request.trace_context),
                device=request.device or "cpu",
            )
        )
        return worker_pb2.PrepareMigrationResponse(
            accepted=reply.accepted, reason=reply.reason, kv_block_nbytes=reply.kv_block_nbytes
        )

    async def MigrationStage(self, request, context):
        ready, reason = await self._migration().destination.stage(
            StageOffer(
                migration_id=_required(request.migration_id, "migration_id"),
                stage_index=request.stage_index,
                first_block_index=request.first_block_index,
                num_blocks=request.num_blocks,
                transfer_id=_required(request.transfer_id, "transfer_id"),
                is_last=request.is_last,
            )
        )
        return worker_pb2.MigrationStageResponse(ready=ready, reason=reason)

    async def CommitMigration(self, request, context):
        handoff = handoff_from_proto(request.state)
        with bind_context(request_id=handoff.state.request_id):
            committed, reason = await self._migration().destination.commit(
                CommitOffer(
                    _required(request.migration_id, "migration_id"), handoff, request.num_blocks
                )
            )
        return worker_pb2.CommitMigrationResponse(committed=committed, reason=reason)

    async def AbortMigration(self, request, context):
        freed = await self._migration().destination.abort(
            _required(request.migration_id, "migration_id"), request.reason or "aborted_by_source"
        )
        return worker_pb2.AbortMigrationResponse(freed=freed)

    # ---- KunServe groups -----------------------------------------------------------------

    def _kunserve(self) -> GroupMembership:
        kunserve = self._ready().kunserve
        if kunserve is None:
            raise UnavailableError("KunServe is not enabled on this worker")
        return kunserve

    async def FormGroup(self, request, context):
        group, num_exchanging, drop_ms = await self._kunserve().form_group(
            group_from_proto(request.group)
        )
        return group_pb2.FormGroupResponse(
            group=group_to_proto(group), num_exchanging_requests=num_exchanging, drop_ms=drop_ms
        )

    async def DissolveGroup(self, request, context):
        moved, preempted, restore_ms = await self._kunserve().dissolve_group(
            _required(request.group_id, "group_id")
        )
        return group_pb2.DissolveGroupResponse(
            num_requests_moved=moved, num_preempted=preempted, restore_ms=restore_ms
        )

    async def PrepareJoin(self, request, context):
        reply = await self._kunserve().prepare_join(group_from_proto(request.group))
        return group_pb2.PrepareJoinResponse(
            accepted=reply.accepted,
            reason=reply.reason,
            num_blocks=reply.num_blocks,
            num_group_blocks_possible=reply.num_group_blocks_possible,
        )

    async def JoinGroup(self, request, context):
        group = group_from_proto(request.group)
        if group.num_group_blocks <= 0:
            raise ValueError(f"group.num_group_blocks={group.num_group_blocks} must be > 0")
        if request.block_offset < 0:
            raise ValueError(f"block_offset={request.block_offset} must be >= 0")
        reply = await self._kunserve().join_group(
            group, request.block_offset, _required(request.epoch, "epoch")
        )
        return group_pb2.JoinGroupResponse(
            requests=[handed_to_proto(r) for r in reply.requests],
            freed_weight_bytes=reply.freed_weight_bytes,
        )

    async def Exchange(self, request, context):
        await self._kunserve().exchange(exchange_from_proto(request))
        return group_pb2.ExchangeResponse()

    async def ExchangeDone(self, request, context):
        await self._kunserve().exchange_done(
            _required(request.group_id, "group_id"),
            _required(request.request_id, "request_id"),
            request.stage,
            request.error,
        )
        return group_pb2.ExchangeDoneResponse()

    async def LeaveGroup(self, request, context):
        restored = await self._kunserve().leave_group(
            _required(request.group_id, "group_id"),
            exchange_from_proto(request.exchange),
            tuple(handed_from_proto(r) for r in request.requests),
        )
        return group_pb2.LeaveGroupResponse(restored_weight_bytes=restored)

    async def AbortGroup(self, request, context):
        await self._kunserve().abort(
            f"told by a member: {request.reason}" if request.reason else "told by a member",
            group_id=_required(request.group_id, "group_id"),
        )
        return group_pb2.AbortGroupResponse()


def _required(value: str, field: str) -> str:
    if not value:
        raise ValueError(f"{field} must not be empty")
    return value
