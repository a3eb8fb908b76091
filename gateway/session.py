"""One client request at the gateway, from placement to its last chunk.

    place()  --dispatch--> Placement --Worker.Submit--> PLACED (other instances on refusal)
    chunks() yields the contiguous tokens as the worker pushes them (via the tracker);
             when the instance is lost, re-places the request with prompt + tokens
             received so far (failover by recompute) and keeps streaming;
    abort()  finishes the stream as ABORT and aborts the request on its worker (client
             abort, or the client went away early).

The session never talks protobuf except for the RequestState it submits.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import NamedTuple

import grpc

from gateway.dispatcher import Dispatcher
from gateway.telemetry import RequestTelemetry
from gateway.tracker import PlacementStatus, RequestTracker
from gateway.validation import GenerationSpec
from gateway.workers import WorkerPool
from services.common.convert import request_to_proto
from services.common.errors import (
    AlreadyExistsError,
    ResourceExhaustedError,
    UnavailableError,
    retry_after_s_from_metadata,
)
from services.common.logging import get_logger
from services.common.messages import FinishReason, OutputDelta, RequestSpec
from services.common.tracing import context_to_dict

log = get_logger(__name__)


class Chunk(NamedTuple):
    """Tokens [first_token_index, first_token_index + len(token_ids)) of the output.

    (A NamedTuple: one is made per streamed message.)"""

    first_token_index: int
    token_ids: list[int]
    finish_reason: FinishReason
    instance_id: str


# First and longest wait between placement tries of a failover (seconds).
FAILOVER_RETRY_S = (0.05, 1.0)


class GenerationSession:
    def __init__(
        self,
        spec: GenerationSpec,
        tracker: RequestTracker,
        dispatcher: Dispatcher,
        pool: WorkerPool,
        owner_address: str,
        max_placements: int,
        failover_wait_s: float = 10.0,
    ) -> None:
        self.spec = spec
        self.tracker = tracker
        self._dispatcher = dispatcher
        self._pool = pool
        self._owner_address = owner_address
        self._max_placements = max_placements
        self._failover_wait_s = failover_wait_s
        self._excluded: set[str] = set()
        self._arrival_time = time.time()
        self._trace_context = context_to_dict()
        self.num_placements = 0
        # The request's timings at the gateway (Generations.run sets it): each chunk
        # handed to the client is reported to it.
        self.telemetry: RequestTelemetry | None = None
        # on_moved(instance_id, address): a move notice for this request (a request
        # resumed from another gateway follows it, gateway/resume.py).
        self.on_moved = None

    @property
    def request_id(self) -> str:
        return self.spec.request_id

    def bind_trace(self) -> None:
        """Hand the current trace context (the request's span) to the workers it runs on."""
        self._trace_context = context_to_dict()

    def _request_state(self):
        return request_to_proto(
            RequestSpec(
                request_id=self.spec.request_id,
                prompt_token_ids=self.spec.prompt_token_ids,
                sampling=self.spec.sampling,
                output_token_ids=tuple(self.tracker.tokens),
                priority=self.spec.priority,
                num_computed_tokens=0,
                arrival_time=self._arrival_time,
                owner_address=self._owner_address,
                trace_context=self._trace_context,
            )
        )

    async def place(self) -> None:
        """Dispatch and submit, trying other instances when one refuses or is down.

        Raises UnavailableError when no instance took it, ValueError when a worker
        found the request itself invalid.
        """
        last_error = ""
        full_retry_after_s: float | None = None  # an instance refused: its queue is full
        for _ in range(self._max_placements):
            try:
                placement = await self._dispatcher.choose(
                    self.request_id,
                    len(self.spec.prompt_token_ids) + len(self.tracker.tokens),
                    self.spec.priority,
                    self._excluded,
                )
            except UnavailableError:
                if full_retry_after_s is None:
                    raise
                break  # every instance left refused or is excluded: shed below
            # Before Submit: a loss noticed while Submit is in flight must reach us.
            self.tracker.mark_placed(placement.instance_id)
            try:
                await self._pool.submit(
                    placement.instance_id, placement.address, self._request_state()
                )
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if code == grpc.StatusCode.INVALID_ARGUMENT:
                    self.tracker.mark_unplaced()
                    raise ValueError(exc.details()) from None
                if (
                    code == grpc.StatusCode.ALREADY_EXISTS
                    and self.tracker.tokens == []
                    and self.num_placements == 0
                ):
                    raise AlreadyExistsError(exc.details()) from None
                if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    hint_s = retry_after_s_from_metadata(exc.trailing_metadata()) or 1.0
                    full_retry_after_s = min(full_retry_after_s or hint_s, hint_s)
                    self._dispatcher.note_full(placement.instance_id, hint_s)
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    # It may have been admitted after all: make sure it does not run twice.
                    self._pool.abort_soon(placement.instance_id, self.request_id)
                self.tracker.mark_unplaced()
                self._excluded.add(placement.instance_id)
                last_error = f"{placement.instance_id}: {code.name}: {exc.details()}"
                (log.info if code == grpc.StatusCode.RESOURCE_EXHAUSTED else log.warning)(
                    "submit_failed",
                    instance_id=placement.instance_id,
                    code=code.name,
                    details=exc.details(),
                )
                continue
            self.num_placements += 1
            if self.tracker.finish_reason is FinishReason.ABORT:
                self._abort_on_worker()  # aborted while Submit was in flight
                return
            # (A short request may also have finished already: its outputs can reach
            # this gateway before Submit's reply does. It was placed all the same.)
            log.info(
                "request_placed",
                instance_id=placement.instance_id,
                source=placement.source.value,
                num_resumed_tokens=len(self.tracker.tokens),
            )
            return
        if full_retry_after_s is not None:
            # Backpressure: the instances' bounded queues are full; the client retries.
            raise ResourceExhaustedError(
                f"no instance has room for request {self.request_id!r}: their waiting "
                f"queues are full (last: {last_error}); retry later",
                full_retry_after_s,
            )
        raise UnavailableError(
            f"no worker could take request {self.request_id!r} after {self._max_placements} tries "
            f"(last: {last_error})"
        )

    async def _place_again(self, lost_instance: str | None) -> None:
        """A failover: when no instance takes the request at first (e.g. a KunServe
        group dissolving after a member died has no stage 0 yet), retry with backoff for
        up to failover_wait_s, each time giving the instances that refused another try."""
        deadline = time.monotonic() + self._failover_wait_s
        delay_s = FAILOVER_RETRY_S[0]
        while True:
            try:
                await self.place()
                return
            except (UnavailableError, ResourceExhaustedError) as exc:
                if time.monotonic() + delay_s > deadline:
                    raise
                log.info("failover_waiting", delay_s=delay_s, error=str(exc))
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, FAILOVER_RETRY_S[1])
            self._excluded = {lost_instance} if lost_instance else set()

    async def chunks(self, start: int = 0) -> AsyncIterator[Chunk]:
        """The output from token index `start` (a resumed stream: what the client
        has not seen yet) as contiguous chunks; the last one carries the finish reason."""
        tracker = self.tracker
        num_sent = start
        while True:
            if tracker.needs_placement:
                lost_instance = tracker.instance_id
                log.warning(
                    "request_failover",
                    instance_id=lost_instance,
                    reason=tracker.lost_reason,
                    num_tokens_received=len(tracker.tokens),
                )
                if lost_instance is not None:
                    self._excluded.add(lost_instance)
                if len(tracker.tokens) >= self.spec.sampling.max_tokens:
                    # Every token arrived but not the finish flag: nothing left to run.
                    tracker.on_output(
                        OutputDelta(self.request_id, len(tracker.tokens), (), FinishReason.LENGTH),
                        lost_instance or "",
                    )
                    continue
                tracker.mark_unplaced()
                await self._place_again(lost_instance)
                continue
            num_tokens = len(tracker.tokens)
            is_finished = tracker.is_finished
            if num_tokens > num_sent or is_finished:
                if self.telemetry is not None:
                    self.telemetry.on_tokens(num_tokens - num_sent)
                yield Chunk(
                    first_token_index=num_sent,
                    token_ids=tracker.tokens[num_sent:num_tokens],
                    finish_reason=tracker.finish_reason if is_finished else FinishReason.NONE,
                    instance_id=tracker.instance_id or "",
                )
                num_sent = num_tokens
                if is_finished:
                    return
                continue
            await tracker.wait_changed()

    def abort(
        self, reason: FinishReason = FinishReason.ABORT, num_tokens: int | None = None
    ) -> bool:
        """Finish the stream (as ABORT, or as STOP at num_tokens when the gateway found a
        stop string) and stop the request on its worker.

        Also used when the client stream ends early. False if it had already finished.
        """
        if self.tracker.is_finished:
            return False
        is_on_worker = self.tracker.status is PlacementStatus.PLACED
        self.tracker.finish_aborted(reason, num_tokens)
        if is_on_worker:
            self._abort_on_worker()
        # Otherwise a placement may be in flight: place() aborts once Submit returns.
        return True

    def _abort_on_worker(self) -> None:
        if self.tracker.instance_id:
            log.info("request_abort", instance_id=self.tracker.instance_id)
            self._pool.abort_soon(self.tracker.instance_id, self.request_id)
