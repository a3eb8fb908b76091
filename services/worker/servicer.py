"""gRPC adapter of a worker: protobuf in, WorkerInstance calls, protobuf out.

The migration RPCs (MigrateOut, PrepareMigration, MigrationStage, CommitMigration,
AbortMigration) are not defined here yet, so they answer UNIMPLEMENTED.
"""

from __future__ import annotations

from protos import worker_pb2, worker_pb2_grpc
from services.common.convert import load_to_proto, request_from_proto
from services.common.errors import UnavailableError
from services.common.logging import bind_context
from services.worker.instance import WorkerInstance


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
