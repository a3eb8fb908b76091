"""The destination's migration RPCs over gRPC, as a DestinationClient.

Transport-level failures (UNAVAILABLE, DEADLINE_EXCEEDED, CANCELLED) become
ConnectionError, which the source treats as "destination unreachable"; every other
status is a bug on one side and propagates.
"""

from __future__ import annotations

import grpc

from protos import common_pb2, worker_pb2, worker_pb2_grpc
from services.common.grpc_client import aio_channel
from services.worker.engine import RequestState, SamplingParams
from services.worker.migration.types import (
    CommitOffer,
    PrepareOffer,
    PrepareReply,
    RequestHandoff,
    StageOffer,
)

_UNREACHABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
}


def handoff_to_proto(handoff: RequestHandoff) -> common_pb2.RequestState:
    state, params = handoff.state, handoff.state.params
    return common_pb2.RequestState(
        request_id=state.request_id,
        prompt_token_ids=list(state.prompt_token_ids),
        output_token_ids=list(state.output_token_ids),
        sampling=common_pb2.SamplingParams(
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            seed=params.seed,
            stop_token_ids=list(params.stop_token_ids),
            ignore_eos=params.ignore_eos,
        ),
        priority=state.priority,
        num_computed_tokens=state.num_computed_tokens,
        arrival_time=state.arrival_time,
        owner_address=handoff.owner_address,
        trace_context=dict(handoff.trace_context),
        placement_epoch=handoff.placement_epoch,
    )


def handoff_from_proto(message: common_pb2.RequestState) -> RequestHandoff:
    """Checks what the engine cannot (ids, owner, seed); the engine checks the rest."""
    if not message.request_id:
        raise ValueError("state.request_id must not be empty")
    if not message.owner_address:
        raise ValueError("state.owner_address must not be empty")
    if not message.sampling.HasField("seed"):
        raise ValueError("state.sampling.seed must be set")
    s = message.sampling
    state = RequestState(
        request_id=message.request_id,
        prompt_token_ids=tuple(message.prompt_token_ids),
        output_token_ids=tuple(message.output_token_ids),
        params=SamplingParams(
            max_tokens=s.max_tokens,
            temperature=s.temperature,
            top_p=s.top_p if s.top_p != 0 else 1.0,
            top_k=s.top_k,
            seed=s.seed,
            stop_token_ids=tuple(s.stop_token_ids),
            ignore_eos=s.ignore_eos,
        ),
        priority=message.priority,
        num_computed_tokens=message.num_computed_tokens,
        arrival_time=message.arrival_time,
    )
    return RequestHandoff(
        state=state,
        owner_address=message.owner_address,
        trace_context=dict(message.trace_context),
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
                lease_ms=offer.lease_ms,
                num_tokens=offer.num_tokens,
                trace_context=offer.trace_context,
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
