"""Gateway failover: take over a request whose gateway died, and stream it on from here.

    Resume(request_id, next_index)
      1. a placeholder registers the id, so outputs its worker re-homes here before the
         worker's answer arrives are kept (not aborted as another gateway's orphans)
      2. Worker.Rehome on every instance the cluster view knows, at once: the ones that
         hold the request (one; two for a moment while it migrates) send its outputs
         here from now on and answer with the request and every token it produced
      3. the answers fill the tracker (de-duplicated by index, like any outputs), and a
         full session (prompt, sampling and seed from the answer) replaces the
         placeholder: it streams from next_index, and is re-placed like any other if
         its worker dies later.

A request that finished while no gateway held it is still answered by its worker for
the retention window (services/worker/output_ledger.py). A migration racing the re-home:
the source answers a Rehome only before its handoff fixed the owner (the handoff then
names this gateway) or after the migration settled (the request is here again, or at
the destination, which the next sweep finds); a re-homed request re-homes again on
every move notice it gets, and is re-placed if the destination no longer has it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc

from gateway.cluster_view import ClusterView
from gateway.dispatcher import Dispatcher
from gateway.generations import PlacementSettings
from gateway.session import GenerationSession
from gateway.sessions import SessionTable
from gateway.tracker import RequestTracker
from gateway.validation import GenerationSpec
from gateway.workers import WorkerPool
from protos import gateway_pb2, worker_pb2
from services.common.convert import finish_reason_from_proto, request_from_proto
from services.common.errors import AlreadyExistsError, NotFoundError, UnavailableError
from services.common.logging import get_logger
from services.common.messages import OutputDelta

log = get_logger(__name__)

# A migration's commit can hide the request from both of its instances for a moment
# (the destination adopts it as the source lets go): look this many times.
SWEEP_TRIES = 3
SWEEP_RETRY_S = 0.2
MAX_REQUEST_ID_LEN = 128


class _Placeholder:
    """Holds the request's id in the session table while the workers answer."""

    def __init__(self, tracker: RequestTracker, on_moved: Callable[[str, str], None]) -> None:
        self.request_id = tracker.request_id
        self.tracker = tracker
        self.on_moved = on_moved


class Resumer:
    """Takes requests over from a dead gateway (the servicer's Resume)."""

    def __init__(
        self,
        *,
        sessions: SessionTable,
        view: ClusterView,
        dispatcher: Dispatcher,
        pool: WorkerPool,
        placement: PlacementSettings,
    ) -> None:
        self._sessions = sessions
        self._view = view
        self._dispatcher = dispatcher
        self._pool = pool
        self._placement = placement
        self._background: set[asyncio.Task] = set()

    async def take_over(self, request: gateway_pb2.ResumeRequest) -> GenerationSession:
        """The request's session, owned here now and registered; the caller runs it
        (without placing it) and streams from request.next_index.

        Raises ValueError naming request_id / next_index, NotFoundError when no
        instance has the request, AlreadyExistsError when it is in flight here already.
        """
        request_id = request.request_id
        if not request_id or len(request_id) > MAX_REQUEST_ID_LEN:
            raise ValueError(
                f"request_id={request_id[:40]!r} must be 1-{MAX_REQUEST_ID_LEN} characters"
            )
        if request.next_index < 0:
            raise ValueError(f"next_index={request.next_index} must be >= 0")
        if self._sessions.get(request_id) is not None:
            raise AlreadyExistsError(
                f"request_id {request_id!r} is already in flight at this gateway"
            )
        if not self._view.instances:
            raise UnavailableError("no instance has registered yet; retry shortly")
        tracker = RequestTracker(request_id)
        placeholder = _Placeholder(tracker, self._follow(request_id, tracker))
        self._sessions.add(placeholder)
        try:
            found = await self._sweep(request_id, request.next_index)
            session = self._session(request, found, tracker)
        finally:
            self._sessions.remove(placeholder, served=False)
        session.on_moved = placeholder.on_moved
        self._sessions.add(session)  # no await since the placeholder left: nothing missed
        log.info(
            "request_resumed",
            request_id=request_id,
            next_index=request.next_index,
            instance_id=tracker.instance_id,
            num_tokens=len(tracker.tokens),
            is_finished=tracker.is_finished,
        )
        return session

    async def _sweep(self, request_id: str, next_index: int) -> list[worker_pb2.RehomeResponse]:
        """Re-home the request on every instance that holds it; their answers."""
        refusal = ""
        for attempt in range(SWEEP_TRIES):
            if attempt:
                await asyncio.sleep(SWEEP_RETRY_S)
            instances = [
                (i.spec.instance_id, i.spec.address) for i in self._view.instances.values()
            ]
            replies = await asyncio.gather(
                *(self._rehome(i, a, request_id, next_index) for i, a in instances),
                return_exceptions=True,
            )
            found = []
            for reply in replies:
                if isinstance(reply, grpc.aio.AioRpcError):
                    if reply.code() == grpc.StatusCode.INVALID_ARGUMENT:
                        refusal = reply.details() or ""
                elif isinstance(reply, BaseException):
                    raise reply
                elif reply.found:
                    found.append(reply)
            if found:
                return found
            if refusal:
                raise ValueError(refusal)
        raise NotFoundError(
            f"request_id {request_id!r} is not running on any instance, nor finished within "
            "the retention window"
        )

    async def _rehome(
        self, instance_id: str, address: str, request_id: str, next_index: int
    ) -> worker_pb2.RehomeResponse:
        try:
            return await self._pool.rehome(
                instance_id, address, request_id, self._placement.owner_address, next_index
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
                log.info(
                    "rehome_failed",
                    request_id=request_id,
                    instance_id=instance_id,
                    code=exc.code().name,
                )
            raise

    def _session(
        self,
        request: gateway_pb2.ResumeRequest,
        found: list[worker_pb2.RehomeResponse],
        tracker: RequestTracker,
    ) -> GenerationSession:
        # The newest placement runs it (a migration's destination over its source).
        primary = max(found, key=lambda r: r.state.placement_epoch)
        tracker.mark_placed(primary.instance_id)
        tracker.placement_epoch = primary.state.placement_epoch
        for reply in found:
            _merge(tracker, reply)
        if request.next_index > len(tracker.tokens):
            raise ValueError(
                f"next_index={request.next_index} is beyond the {len(tracker.tokens)} tokens "
                f"request {request.request_id!r} has produced"
            )
        state = request_from_proto(primary.state)
        spec = GenerationSpec(
            request_id=state.request_id,
            prompt_token_ids=state.prompt_token_ids,
            sampling=state.sampling,
            priority=state.priority,
            detokenize=request.detokenize,
        )
        session = GenerationSession(
            spec,
            tracker,
            self._dispatcher,
            self._pool,
            self._placement.owner_address,
            self._placement.max_placements,
            self._placement.failover_wait_s,
        )
        session.num_placements = 1
        return session

    def _follow(self, request_id: str, tracker: RequestTracker) -> Callable[[str, str], None]:
        """on_moved for a re-homed request: re-home it on the migration's destination
        too (it may have been handed over with the old gateway as owner)."""

        def on_moved(instance_id: str, address: str) -> None:
            task = asyncio.create_task(
                self._rehome_moved(request_id, tracker, instance_id, address)
            )
            self._background.add(task)
            task.add_done_callback(self._background.discard)

        return on_moved

    async def _rehome_moved(
        self, request_id: str, tracker: RequestTracker, instance_id: str, address: str
    ) -> None:
        try:
            reply = await self._rehome(instance_id, address, request_id, 0)
        except grpc.aio.AioRpcError:
            return  # it died: the session's health watch on it re-places the request
        if reply.found:
            _merge(tracker, reply)
        elif tracker.mark_lost(instance_id, f"not found at {instance_id} after it moved there"):
            # Gone from where it moved (e.g. aborted there before this re-home): the
            # session re-places it with prompt + tokens, as if that worker had died.
            log.warning("moved_request_not_found", request_id=request_id, instance_id=instance_id)


def _merge(tracker: RequestTracker, reply: worker_pb2.RehomeResponse) -> None:
    """A worker's answer as one output: every token so far, and the finish if any."""
    tracker.on_output(
        OutputDelta(
            reply.state.request_id,
            0,
            tuple(reply.state.output_token_ids),
            finish_reason_from_proto(reply.finish_reason),
        ),
        reply.instance_id,
    )
