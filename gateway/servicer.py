"""gRPC adapters of the gateway: the client API (Gateway) and the workers' OutputSink.

Thin: convert at the edge, then hand over to Generations (generations.py), the path
the OpenAI HTTP API shares.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib

from gateway.generations import Generations
from gateway.key_limits import key_from_metadata
from gateway.resume import Resumer
from gateway.sessions import SessionTable
from gateway.tokenizer import IncrementalDetokenizer
from gateway.workers import WorkerPool
from protos import gateway_pb2, gateway_pb2_grpc
from services.common.convert import finish_reason_to_proto, outputs_from_proto
from services.common.errors import NotFoundError, UnavailableError
from services.common.logging import bind_context, get_logger
from services.common.messages import FinishReason

log = get_logger(__name__)


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    """The gRPC client API: GenerateRequest in, GenerateChunk messages out."""

    def __init__(
        self, generations: Generations, model_id: str, resumer: Resumer | None = None
    ) -> None:
        """resumer: takes over requests of a dead gateway (None: Resume is UNAVAILABLE)."""
        self._generations = generations
        self._resumer = resumer
        self._sessions = generations.sessions
        self._view = generations.view
        self._tokenizer = generations.tokenizer
        self._model_id = model_id

    async def _messages(self, session, resume_at: int | None = None):
        """Place and stream one opened session (or stream a resumed one from token index
        resume_at): yields GenerateChunk messages."""
        async with self._generations.run(session, place=resume_at is None):
            detokenizer = (
                IncrementalDetokenizer(self._tokenizer) if session.spec.detokenize else None
            )
            if detokenizer is not None and resume_at:
                detokenizer.push(session.tracker.tokens[:resume_at])  # text the client has
            is_first = True
            async for chunk in session.chunks(resume_at or 0):
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
        # aclosing: a client that goes away closes the inner generator in this task too.
        session = self._generations.open(request, key_from_metadata(context.invocation_metadata()))
        async with contextlib.aclosing(self._messages(session)) as messages:
            async for message in messages:
                yield message

    async def Resume(self, request, context):
        if self._resumer is None:
            raise UnavailableError("this gateway does not take requests over")
        with bind_context(request_id=request.request_id):
            session = await self._resumer.take_over(request)
        async with contextlib.aclosing(self._messages(session, request.next_index)) as messages:
            async for message in messages:
                yield message

    async def GenerateUnary(self, request, context):
        token_ids: list[int] = []
        text: list[str] = []
        response = gateway_pb2.GenerateResponse()
        session = self._generations.open(request, key_from_metadata(context.invocation_metadata()))
        async with contextlib.aclosing(self._messages(session)) as messages:
            async for message in messages:
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
