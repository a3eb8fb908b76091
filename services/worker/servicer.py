"""gRPC adapter of a worker: protobuf in, WorkerInstance calls, protobuf out.

The migration RPCs (MigrateOut on the source; PrepareMigration, MigrationStage,
CommitMigration, AbortMigration on the destination) go to services.worker.migration.
"""

from __future__ import annotations

from protos import worker_pb2, worker_pb2_grpc
from services.common.convert import (
    kernels_from_proto,
    load_to_proto,
    migration_mode_from_proto,
    migration_status_to_proto,
    request_from_proto,
)
from services.common.errors import UnavailableError
from services.common.logging import bind_context
from services.worker.instance import WorkerInstance
from services.worker.migration import (
    CommitOffer,
    MigrationTarget,
    PrepareOffer,
    StageOffer,
)
from services.worker.migration.grpc_client import handoff_from_proto
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


def _required(value: str, field: str) -> str:
    if not value:
        raise ValueError(f"{field} must not be empty")
    return value
