"""gRPC adapters of the gateway: the client API (Gateway) and the workers' OutputSink.

Thin: validate and convert at the edge, then hand over to GenerationSession.
"""

from __future__ import annotations

import asyncio
import collections
import random

from opentelemetry import trace

from gateway.admission import AdmissionControl
from gateway.cluster_view import ClusterView
from gateway.dispatcher import Dispatcher
from gateway.session import GenerationSession
from gateway.telemetry import GatewayMetrics, RequestTelemetry
from gateway.tokenizer import IncrementalDetokenizer
from gateway.tracker import RequestTracker
from gateway.validation import validate_generate
from gateway.workers import WorkerPool
from protos import gateway_pb2, gateway_pb2_grpc
from services.common.convert import finish_reason_to_proto, outputs_from_proto
from services.common.errors import AlreadyExistsError, NotFoundError, UnavailableError
from services.common.logging import bind_context, get_logger
from services.common.messages import FinishReason

log = get_logger(__name__)
tracer = trace.get_tracer("llmesh.gateway")


class SessionTable:
    """In-flight sessions by request id; routes worker outputs and instance losses."""

    def __init__(self) -> None:
        self._sessions: dict[str, GenerationSession] = {}
        # on_moved(instance_id, address): a request migrated there (watch that worker).
        self.on_moved = None
        self._empty = asyncio.Event()
        self._empty.set()

    def __len__(self) -> int:
        return len(self._sessions)

    def add(self, session: GenerationSession) -> None:
        if session.request_id in self._sessions:
            raise AlreadyExistsError(f"request_id {session.request_id!r} is already in flight")
        self._sessions[session.request_id] = session
        self._empty.clear()

    def remove(self, session: GenerationSession) -> None:
        if self._sessions.get(session.request_id) is session:
            del self._sessions[session.request_id]
        if not self._sessions:
            self._empty.set()

    async def wait_empty(self) -> None:
        await self._empty.wait()

    def get(self, request_id: str) -> GenerationSession | None:
        return self._sessions.get(request_id)

    def on_outputs(self, instance_id: str, deltas) -> list[str]:
        """Route a batch; returns the ids of unfinished requests no session here owns."""
        orphans = []
        for delta in deltas:
            session = self._sessions.get(delta.request_id)
            if session is not None:
                if delta.moved_to_instance_id and self.on_moved is not None:
                    self.on_moved(delta.moved_to_instance_id, delta.moved_to_address)
                session.tracker.on_output(delta, instance_id)
            elif not delta.is_finished:
                orphans.append(delta.request_id)
        return orphans

    def on_instance_lost(self, instance_id: str, reason: str) -> None:
        num_affected = sum(
            s.tracker.mark_lost(instance_id, reason) for s in self._sessions.values()
        )
        if num_affected:
            log.warning(
                "instance_lost_requests", instance_id=instance_id, num_requests=num_affected
            )


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(
        self,
        *,
        sessions: SessionTable,
        view: ClusterView,
        dispatcher: Dispatcher,
        pool: WorkerPool,
        admission: AdmissionControl,
        tokenizer,
        owner_address: str,
        model_id: str,
        max_placements: int,
        failover_wait_s: float = 10.0,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self._metrics = metrics  # None: request metrics are not recorded
        self._sessions = sessions
        self._view = view
        self._dispatcher = dispatcher
        self._pool = pool
        self._admission = admission
        self._tokenizer = tokenizer
        self._owner_address = owner_address
        self._model_id = model_id
        self._max_placements = max_placements
        self._failover_wait_s = failover_wait_s
        self._rng = random.Random()

    def _new_session(self, request: gateway_pb2.GenerateRequest) -> GenerationSession:
        limits = self._view.model_limits()
        if limits is None:
            raise UnavailableError("no instance has registered yet; retry shortly")
        spec = validate_generate(request, limits, self._tokenizer.encode, self._rng)
        self._admission.check(len(self._sessions), self._view)
        session = GenerationSession(
            spec,
            RequestTracker(spec.request_id),
            self._dispatcher,
            self._pool,
            self._owner_address,
            self._max_placements,
            self._failover_wait_s,
        )
        self._sessions.add(session)
        return session

    async def _stream(self, session: GenerationSession):
        """Place and stream one validated request: yields GenerateChunk messages."""
        span = trace.get_current_span()
        span.set_attribute("llmesh.request_id", session.request_id)
        span.set_attribute("llmesh.num_prompt_tokens", len(session.spec.prompt_token_ids))
        with bind_context(request_id=session.request_id):
            log.info(
                "request_received",
                num_prompt_tokens=len(session.spec.prompt_token_ids),
                max_tokens=session.spec.sampling.max_tokens,
            )
            telemetry = RequestTelemetry(self._metrics, session.spec, self._model_id)
            finish_reason = ""
            try:
                with tracer.start_as_current_span("gateway.place"):
                    await session.place()
                async for message in self._messages(session):
                    telemetry.on_tokens(len(message.token_ids))
                    yield message
                finish_reason = session.tracker.finish_reason.value
                span.set_attribute("llmesh.num_output_tokens", len(session.tracker.tokens))
                span.set_attribute("llmesh.finish_reason", session.tracker.finish_reason.value)
                log.info(
                    "request_finished",
                    finish_reason=session.tracker.finish_reason.value,
                    num_output_tokens=len(session.tracker.tokens),
                    num_placements=session.num_placements,
                )
            finally:
                telemetry.finish(finish_reason)
                if session.abort():  # the client went away (or an error) before the end
                    log.info("request_cancelled", num_output_tokens=len(session.tracker.tokens))
                self._sessions.remove(session)

    async def _messages(self, session: GenerationSession):
        detokenizer = IncrementalDetokenizer(self._tokenizer) if session.spec.detokenize else None
        is_first = True
        async for chunk in session.chunks():
            message = gateway_pb2.GenerateChunk(
                request_id=session.request_id,
                first_token_index=chunk.first_token_index,
                token_ids=chunk.token_ids,
                finish_reason=finish_reason_to_proto(chunk.finish_reason),
                instance_id=chunk.instance_id,
            )
            if is_first:
                message.seed = session.spec.sampling.seed
                is_first = False
            if detokenizer is not None:
                num_tokens = chunk.first_token_index + len(chunk.token_ids)
                message.text = detokenizer.push(
                    session.tracker.tokens[:num_tokens],
                    is_final=chunk.finish_reason is not FinishReason.NONE,
                )
            yield message

    async def Generate(self, request, context):
        with tracer.start_as_current_span("gateway.generate"):
            session = self._new_session(request)
            async for message in self._stream(session):
                yield message

    async def GenerateUnary(self, request, context):
        token_ids: list[int] = []
        text: list[str] = []
        response = gateway_pb2.GenerateResponse()
        with tracer.start_as_current_span("gateway.generate"):
            session = self._new_session(request)
            async for message in self._stream(session):
                token_ids.extend(message.token_ids)
                text.append(message.text)
                response.finish_reason = message.finish_reason
        response.request_id = session.request_id
        response.seed = session.spec.sampling.seed
        response.token_ids.extend(token_ids)
        response.text = "".join(text)
        response.num_prompt_tokens = len(session.spec.prompt_token_ids)
        return response

    async def Abort(self, request, context):
        session = self._sessions.get(request.request_id)
        if session is None:
            raise NotFoundError(
                f"request_id {request.request_id!r} is not in flight at this gateway"
            )
        with bind_context(request_id=request.request_id):
            aborted = session.abort()
            log.info("request_aborted_by_client", aborted=aborted)
        return gateway_pb2.AbortResponse(aborted=aborted)

    async def GetModelInfo(self, request, context):
        limits = self._view.model_limits()
        info = gateway_pb2.ModelInfo(
            model_id=self._model_id, num_instances=len(self._view.instances)
        )
        if limits is not None:
            info.model_id = limits.model_id
            info.vocab_size = limits.vocab_size
            info.max_model_len = limits.max_model_len
            info.eos_token_id = limits.eos_token_id
        return info


class OutputSinkServicer(gateway_pb2_grpc.OutputSinkServicer):
    """Workers push each engine step's tokens for this gateway's requests.

    The streams are long-lived, so a graceful stop would wait its whole grace period
    for them: `close()` (once no request is in flight) ends them from this side.
    """

    def __init__(self, sessions: SessionTable, pool: WorkerPool) -> None:
        self._sessions = sessions
        self._pool = pool
        self._closing = asyncio.Event()
        # Requests this gateway no longer serves but a worker still runs (e.g. a Submit
        # that landed after the client left): aborted once each.
        self._aborted_orphans: collections.OrderedDict[str, None] = collections.OrderedDict()

    def close(self) -> None:
        self._closing.set()

    def _abort_orphan(self, instance_id: str, request_id: str) -> None:
        if request_id in self._aborted_orphans:
            return
        self._aborted_orphans[request_id] = None
        if len(self._aborted_orphans) > 10_000:
            self._aborted_orphans.popitem(last=False)
        # Usually a request the client just cancelled (its Abort is on the way).
        log.debug("orphan_output_aborted", request_id=request_id, instance_id=instance_id)
        self._pool.abort_soon(instance_id, request_id)

    async def PushOutputs(self, request_iterator, context):
        num_batches = 0

        async def consume() -> None:
            nonlocal num_batches
            async for batch in request_iterator:
                num_batches += 1
                for request_id in self._sessions.on_outputs(
                    batch.instance_id, outputs_from_proto(batch)
                ):
                    self._abort_orphan(batch.instance_id, request_id)

        reader = asyncio.ensure_future(consume())
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            await asyncio.wait({reader, closing}, return_when=asyncio.FIRST_COMPLETED)
            if reader.done():
                reader.result()  # re-raise a broken stream
        finally:
            reader.cancel()
            closing.cancel()
        return gateway_pb2.PushOutputsAck(num_batches=num_batches)
