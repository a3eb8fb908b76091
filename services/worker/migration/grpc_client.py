"""The destination's migration RPCs over gRPC, as a DestinationClient.

Transport-level failures (UNAVAILABLE, DEADLINE_EXCEEDED, CANCELLED) become
ConnectionError, which the source treats as "destination unreachable"; every other
status is a bug on one side and propagates.
"""

from __future__ import annotations

import grpc

from protos import common_pb2, worker_pb2, worker_pb2_grpc
from services.common.convert import kernels_to_proto, request_from_proto, request_to_proto
from services.common.grpc_client import aio_channel
from services.common.messages import RequestSpec, SamplingSpec
from services.worker.migration.types import (
    CommitOffer,
    PrepareOffer,
    PrepareReply,
    RequestHandoff,
    StageOffer,
)
from services.worker.requests import engine_state

_UNREACHABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
}


def handoff_to_proto(handoff: RequestHandoff) -> common_pb2.RequestState:
    state, params = handoff.state, handoff.state.params
    message = request_to_proto(
        RequestSpec(
            request_id=state.request_id,
            prompt_token_ids=state.prompt_token_ids,
            sampling=SamplingSpec(
                max_tokens=params.max_tokens,
                temperature=params.temperature,
                top_p=params.top_p,
                top_k=params.top_k,
                seed=params.seed,
                stop_token_ids=params.stop_token_ids,
                ignore_eos=params.ignore_eos,
            ),
            output_token_ids=state.output_token_ids,
            priority=state.priority,
            num_computed_tokens=state.num_computed_tokens,
            arrival_time=state.arrival_time,
            owner_address=handoff.owner_address,
            trace_context=dict(handoff.trace_context),
        )
    )
    message.placement_epoch = handoff.placement_epoch
    return message


def handoff_from_proto(message: common_pb2.RequestState) -> RequestHandoff:
    """Checks what the engine cannot (ids, owner, seed); the engine checks the rest."""
    spec = request_from_proto(message)
    return RequestHandoff(
        state=engine_state(spec),
        owner_address=spec.owner_address,
        trace_context=spec.trace_context,
        placement_epoch=message.placement_epoch,
    )


class GrpcDestinationClient:
    def __init__(self, address: str, timeout_s: float) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._channel = aio_channel(address)
        self._stub = worker_pb2_grpc.WorkerStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, method, request):
        try:
            return await method(request, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in _UNREACHABLE:
                raise ConnectionError(
                    f"{self.address}: {exc.code().name}: {exc.details()}"
                ) from exc
            raise

    async def prepare(self, offer: PrepareOffer) -> PrepareReply:
        reply = await self._call(
            self._stub.PrepareMigration,
            worker_pb2.PrepareMigrationRequest(
                migration_id=offer.migration_id,
                request_id=offer.request_id,
                src_instance_id=offer.src_instance_id,
                src_transport_address=offer.src_transport_address,
                num_blocks=offer.num_blocks,
                lease_ms=round(offer.lease_s * 1000),
                num_tokens=offer.num_tokens,
                kernels=kernels_to_proto(offer.kernels),
                trace_context=offer.trace_context,
                device=offer.device,
            ),
        )
        return PrepareReply(reply.accepted, reply.reason, reply.kv_block_nbytes)

    async def stage(self, offer: StageOffer) -> tuple[bool, str]:
        reply = await self._call(
            self._stub.MigrationStage,
            worker_pb2.MigrationStageRequest(
                migration_id=offer.migration_id,
                stage_index=offer.stage_index,
                first_block_index=offer.first_block_index,
                num_blocks=offer.num_blocks,
                transfer_id=offer.transfer_id,
                is_last=offer.is_last,
            ),
        )
        return reply.ready, reply.reason

    async def commit(self, offer: CommitOffer) -> tuple[bool, str]:
        reply = await self._call(
            self._stub.CommitMigration,
            worker_pb2.CommitMigrationRequest(
                migration_id=offer.migration_id,
                state=handoff_to_proto(offer.handoff),
                num_blocks=offer.num_blocks,
            ),
        )
        return reply.committed, reply.reason

    async def abort(self, migration_id: str, reason: str) -> bool:
        reply = await self._call(
            self._stub.AbortMigration,
            worker_pb2.AbortMigrationRequest(migration_id=migration_id, reason=reason),
        )
        return reply.freed
