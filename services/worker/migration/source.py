"""Source side: the multi-stage live-migration protocol of one request.

Block ranges of a request with block_size 4, while it decodes (x = computed token):

    block table:  [ 0 ][ 1 ][ 2 ][ 3 ][ 4 ]
    tokens:       xxxx xxxx xxxx xxxx xx..
    stage 0:      |<--- full blocks --->|          copied while decoding continues
    stage 1:                          [4] ...     blocks completed during stage 0
    last stage:   request suspended; the partial tail block(s) + state, then commit

Full blocks are append-only and never written again, so stages read them off the engine
thread while it keeps stepping, then check on the engine thread that the request still
owns them (not preempted, finished or aborted meanwhile). Only the last stage stops the
request, and it copies a bounded number of blocks: downtime does not grow with length.
How a stage's blocks travel (chunks, read-ahead, staging buffers) is stages.py's job.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode

from kvtransport import Transport
from services.common.logging import bind_context, get_logger
from services.common.tracing import context_from_dict, context_to_dict, get_tracer
from services.worker.async_engine import AsyncEngine
from services.worker.engine import LLMEngine, RequestState, RequestStatus
from services.worker.migration.config import MigrationConfig
from services.worker.migration.faults import NO_FAULTS, FaultHooks
from services.worker.migration.stages import StageProgress, StageSender
from services.worker.migration.status import (
    SOURCE_TRANSITIONS,
    AbortReason,
    MigrationAborted,
    MigrationMode,
    MigrationStatus,
    check_transition,
)
from services.worker.migration.types import (
    CommitOffer,
    DestinationClient,
    MigrationResult,
    MigrationTarget,
    PrepareOffer,
    RequestHandoff,
)

log = get_logger(__name__)
tracer = get_tracer(__name__)


@dataclass(frozen=True)
class _Snapshot:
    status: RequestStatus | None
    block_ids: tuple[int, ...]
    num_computed_tokens: int
    num_tokens: int


@dataclass(frozen=True)
class _Suspended:
    """What suspending the request found: its snapshot and, if it was suspended, its
    state and when it stopped making progress."""

    snap: _Snapshot
    state: RequestState | None = None  # None: not suspended (lost its blocks, finished)
    stopped_at: float = 0.0  # time.perf_counter()


@dataclass
class _Migration:
    migration_id: str
    request_id: str
    target: MigrationTarget
    mode: MigrationMode = MigrationMode.LIVE
    status: MigrationStatus = MigrationStatus.PREPARING
    sent: StageProgress = field(init=False)  # stages, blocks and bytes sent so far
    downtime_ms: float = 0.0
    num_rounds: int = 0  # live stages (copy rounds) done; each is one or more transfers
    is_preempted: bool = False  # set from the engine thread by the preemption callback
    # From the handoff's making (its owner gateway is fixed in it) until the migration
    # settled (committed and forgotten here, or aborted and running here again).
    is_handing_over: bool = False
    settled: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.sent = StageProgress(self.migration_id, self.target.transport_address)

    def set_status(self, status: MigrationStatus) -> None:
        check_transition(SOURCE_TRANSITIONS, self.status, status)
        self.status = status


def _snapshot(engine: LLMEngine, request_id: str) -> _Snapshot:
    status = engine.request_status(request_id)
    if status is None or status.is_finished:
        return _Snapshot(status, (), 0, 0)
    state = engine.migration.export_request_state(request_id)
    block_ids = (
        tuple(engine.migration.request_block_ids(request_id))
        if status is not RequestStatus.WAITING
        else ()
    )
    return _Snapshot(status, block_ids, state.num_computed_tokens, state.num_tokens)


class MigrationSource:
    """Runs outgoing migrations for one worker."""

    def __init__(
        self,
        instance_id: str,
        async_engine: AsyncEngine,
        transport: Transport,
        config: MigrationConfig,
        client_for: Callable[[MigrationTarget], DestinationClient],
        handoff_for: Callable[[str, object], RequestHandoff],
        on_committed: Callable[[RequestHandoff, MigrationTarget], Awaitable[None] | None]
        | None = None,
        faults: FaultHooks = NO_FAULTS,
        trace_context_of: Callable[[str], dict[str, str]] = lambda request_id: {},
    ) -> None:
        """handoff_for(request_id, state) wraps the engine state with what the worker
        keeps beside it (owner gateway, trace context, placement epoch); `faults` are
        the tests' hooks into the protocol (none by default); trace_context_of(request_id)
        is the request's span here, the parent of its migration's span."""
        self._trace_context_of = trace_context_of
        self._instance_id = instance_id
        self._engine = async_engine
        self._transport = transport
        self._config = config
        self._client_for = client_for
        self._handoff_for = handoff_for
        self._on_committed = on_committed
        self._faults = faults
        self._active: dict[str, _Migration] = {}
        self._lock = threading.Lock()
        self._slots = asyncio.Semaphore(config.max_outgoing)
        self._stages = StageSender(async_engine.engine, transport, config, faults)
        self.results: list[MigrationResult] = []
        async_engine.engine.add_preemption_callback(self._on_preempted)

    @property
    def num_active(self) -> int:
        return len(self._active)

    def is_migrating(self, request_id: str) -> bool:
        return request_id in self._active

    def is_handing_over(self, request_id: str) -> bool:
        migration = self._active.get(request_id)
        return migration is not None and migration.is_handing_over

    async def wait_handed_over(self, request_id: str) -> None:
        """Until a migration of request_id that already made its handoff has settled.

        A Rehome (gateway failover) waits here before it changes the request's owner:
        otherwise the owner could change after the handoff fixed the old one, and the
        destination would send the request's outputs (and this worker its move notice)
        to the dead gateway. Once settled, the request is either here again (the owner
        change applies here and to any later handoff) or adopted by the destination,
        which a Rehome then finds there."""
        migration = self._active.get(request_id)
        while migration is not None and migration.is_handing_over:
            await migration.settled.wait()
            migration = self._active.get(request_id)

    def _on_preempted(self, request_id: str) -> None:  # engine thread
        with self._lock:
            migration = self._active.get(request_id)
            if migration is not None:
                migration.is_preempted = True

    async def migrate(
        self, request_id: str, target: MigrationTarget, mode: MigrationMode = MigrationMode.LIVE
    ) -> MigrationResult:
        """Move request_id to target; the request keeps running here on any failure.

        mode LIVE is the Llumnix protocol; BLOCKING_COPY (stop, copy every block) and
        RECOMPUTE (stop, re-prefill at the destination) are the baselines it is measured
        against, and RECOMPUTE also moves a request where no data plane is reachable."""
        migration_id = uuid.uuid4().hex[:16]
        if request_id in self._active:
            return MigrationResult(
                migration_id, request_id, MigrationStatus.ABORTED, "already_migrating"
            )
        migration = _Migration(migration_id, request_id, target, MigrationMode(mode))
        with self._lock:
            self._active[request_id] = migration
        started = time.perf_counter()
        try:
            async with self._slots:
                with (
                    bind_context(request_id=request_id, migration_id=migration_id),
                    self._span(migration) as span,
                ):
                    reason = ""
                    try:
                        await self._run(migration)
                    except MigrationAborted as exc:
                        reason = str(exc)
                        span.set_status(Status(StatusCode.ERROR, reason))
                    span.set_attributes(
                        {
                            "llmesh.outcome": migration.status.value,
                            "llmesh.reason": reason,
                            "llmesh.num_stages": migration.sent.num_stages,
                            "llmesh.num_blocks": migration.sent.num_blocks_sent,
                            "llmesh.num_bytes": migration.sent.num_bytes,
                            "llmesh.downtime_ms": migration.downtime_ms,
                        }
                    )
                    log.info(
                        "migration_finished",
                        status=migration.status.value,
                        reason=reason,
                        num_stages=migration.sent.num_stages,
                        num_blocks=migration.sent.num_blocks_sent,
                        downtime_ms=round(migration.downtime_ms, 3),
                        dst_instance_id=target.instance_id,
                    )
        finally:
            with self._lock:
                self._active.pop(request_id, None)
            migration.settled.set()
        result = MigrationResult(
            migration_id=migration_id,
            request_id=request_id,
            status=migration.status,
            reason=reason,
            num_stages=migration.sent.num_stages,
            num_blocks=migration.sent.num_blocks_sent,
            downtime_ms=migration.downtime_ms,
            num_bytes=migration.sent.num_bytes,
            duration_ms=(time.perf_counter() - started) * 1000,
        )
        self.results.append(result)
        del self.results[:-256]
        return result

    def _span(self, m: _Migration):
        """The migration's span: a child of the request's span here (one request, one
        trace), linked to what ordered it (a scheduler decision, an operator's call)."""
        ordered_by = trace.get_current_span().get_span_context()
        return tracer.start_as_current_span(
            "migration",
            context=context_from_dict(self._trace_context_of(m.request_id)),
            links=[trace.Link(ordered_by)] if ordered_by.is_valid else (),
            attributes={
                "llmesh.request_id": m.request_id,
                "llmesh.migration_id": m.migration_id,
                "llmesh.mode": m.mode.value,
                "llmesh.src_instance_id": self._instance_id,
                "llmesh.dst_instance_id": m.target.instance_id,
            },
        )

    # ---- protocol --------------------------------------------------------------------

    async def _run(self, m: _Migration) -> None:
        client = self._client_for(m.target)
        snap = await self._engine.run(lambda e: _snapshot(e, m.request_id))
        if snap.status is not RequestStatus.RUNNING:
            m.set_status(MigrationStatus.ABORTED)
            raise MigrationAborted(AbortReason.REQUEST_NOT_RUNNING, str(snap.status))
        await self._handshake(client, m, snap)
        sent_ids = await self._copy_live_stages(client, m)
        suspended = await self._suspend(client, m, sent_ids)
        handoff = await self._last_stage_and_commit(client, m, suspended, sent_ids)
        # The destination runs it from here: downtime ends at its adoption, not when
        # this engine gets round to freeing the blocks.
        m.downtime_ms = (time.perf_counter() - suspended.stopped_at) * 1000
        await self._engine.run(lambda e: e.migration.remove_request(m.request_id))
        m.set_status(MigrationStatus.COMMITTED)
        if self._on_committed is not None:
            result = self._on_committed(handoff, m.target)
            if asyncio.iscoroutine(result):
                await result

    async def _handshake(self, client, m: _Migration, snap: _Snapshot) -> None:
        """1. The destination reserves blocks under a lease (PREPARING -> COPYING)."""
        engine = self._engine.engine
        num_blocks = (
            0
            if m.mode is MigrationMode.RECOMPUTE
            else len(snap.block_ids) + self._config.reserve_slack_blocks
        )
        offer = PrepareOffer(
            migration_id=m.migration_id,
            request_id=m.request_id,
            src_instance_id=self._instance_id,
            src_transport_address=self._transport.address,
            num_blocks=num_blocks,
            lease_s=self._config.lease_s,
            num_tokens=snap.num_tokens,
            kernels=engine.kernels,
            trace_context=context_to_dict(),
            device=engine.device_kind,
        )
        try:
            with tracer.start_as_current_span(
                "migration.prepare", attributes={"llmesh.num_blocks_reserved": num_blocks}
            ):
                reply = await client.prepare(offer)
        except ConnectionError as exc:
            m.set_status(MigrationStatus.ABORTED)
            raise MigrationAborted(AbortReason.DESTINATION_UNREACHABLE, str(exc)) from exc
        if not reply.accepted:
            m.set_status(MigrationStatus.ABORTED)
            raise MigrationAborted(AbortReason.DESTINATION_REFUSED, reply.reason)
        if reply.kv_block_nbytes != engine.kv_block_nbytes:
            await self._abort_remote(client, m, AbortReason.INCOMPATIBLE)
            raise MigrationAborted(
                AbortReason.INCOMPATIBLE,
                f"destination blocks are {reply.kv_block_nbytes} bytes, ours {engine.kv_block_nbytes}",
            )
        m.set_status(MigrationStatus.COPYING)

    async def _copy_live_stages(self, client, m: _Migration) -> tuple[int, ...]:
        """2. Copy full blocks while the request keeps decoding; returns the ids sent."""
        block_size = self._engine.engine.config.block_size
        sent_ids: tuple[int, ...] = ()
        try:
            while m.mode is MigrationMode.LIVE:
                # Also the check of the previous stage: its blocks are still this request's.
                snap = await self._engine.run(lambda e: _snapshot(e, m.request_id))
                self._check_still_owned(m, snap, expect_prefix=sent_ids)
                num_full = snap.num_computed_tokens // block_size
                if (
                    num_full - len(sent_ids) <= self._config.last_stage_max_blocks
                    or m.num_rounds >= self._config.max_stages - 1
                ):
                    break
                # Full blocks never change: read them beside the engine's steps.
                await self._stages.send_blocks(
                    client, m.sent, len(sent_ids), snap.block_ids[len(sent_ids) : num_full],
                    is_last=False,
                )  # fmt: skip
                m.num_rounds += 1
                sent_ids = snap.block_ids[:num_full]
        except MigrationAborted:
            await self._abort_remote(client, m, None)
            raise
        return sent_ids

    async def _suspend(self, client, m: _Migration, sent_ids: tuple[int, ...]) -> _Suspended:
        """3. Stop the request here (COPYING -> STOPPED) unless it lost the blocks sent."""

        def suspend(e: LLMEngine) -> _Suspended:
            s = _snapshot(e, m.request_id)
            if (
                s.status is not RequestStatus.RUNNING
                or m.is_preempted
                or s.block_ids[: len(sent_ids)] != sent_ids
            ):
                return _Suspended(s)
            e.migration.suspend_request(m.request_id)
            stopped_at = time.perf_counter()  # the request stops making progress here
            return _Suspended(s, e.migration.export_request_state(m.request_id), stopped_at)

        suspended = await self._engine.run(suspend)
        if suspended.state is None:
            await self._abort_remote(client, m, None)
            snap = suspended.snap
            self._check_still_owned(m, snap, expect_prefix=sent_ids)  # the precise reason
            raise MigrationAborted(AbortReason.REQUEST_FINISHED, str(snap.status))
        m.set_status(MigrationStatus.STOPPED)
        if m.mode is MigrationMode.RECOMPUTE:  # no KV travels: the destination re-prefills
            state = dataclasses.replace(suspended.state, num_computed_tokens=0)
            suspended = dataclasses.replace(suspended, state=state)
        return suspended

    async def _last_stage_and_commit(
        self, client, m: _Migration, suspended: _Suspended, sent_ids: tuple[int, ...]
    ) -> RequestHandoff:
        """4. Copy the rest and hand the request over (STOPPED -> COMMITTING); on any
        failure the request resumes here and the destination drops its reservation."""
        snap, state = suspended.snap, suspended.state
        num_blocks = math.ceil(state.num_computed_tokens / self._engine.engine.config.block_size)
        try:
            if m.mode is not MigrationMode.RECOMPUTE:
                await self._stages.send_blocks(
                    client, m.sent, len(sent_ids), snap.block_ids[len(sent_ids) : num_blocks],
                    is_last=True,
                )  # fmt: skip
            m.set_status(MigrationStatus.COMMITTING)
            await self._faults.before_commit()
            handoff = self._handoff_for(m.request_id, state)
            m.is_handing_over = True  # a Rehome here waits until the commit settled
            await self._faults.after_handoff()
            with tracer.start_as_current_span("migration.commit"):
                committed, detail = await self._commit(
                    client, CommitOffer(m.migration_id, handoff, num_blocks)
                )
        except MigrationAborted as exc:
            await self._resume_here(m)
            await self._abort_remote(client, m, exc.reason)
            raise
        if not committed:
            await self._resume_here(m)
            await self._abort_remote(client, m, AbortReason.COMMIT_REFUSED)
            raise MigrationAborted(AbortReason.COMMIT_REFUSED, detail)
        return handoff

    def _check_still_owned(
        self, m: _Migration, snap: _Snapshot, expect_prefix: tuple[int, ...] = ()
    ) -> None:
        if m.is_preempted or snap.status is RequestStatus.WAITING:
            raise MigrationAborted(AbortReason.REQUEST_PREEMPTED)
        if snap.status is None or snap.status.is_finished:
            raise MigrationAborted(AbortReason.REQUEST_FINISHED, str(snap.status))
        if snap.block_ids[: len(expect_prefix)] != expect_prefix:
            raise MigrationAborted(AbortReason.REQUEST_PREEMPTED, "block table changed")

    async def _commit(self, client, offer: CommitOffer) -> tuple[bool, str]:
        last_error: Exception | None = None
        for _ in range(self._config.commit_attempts):
            try:
                return await client.commit(offer)
            except ConnectionError as exc:  # idempotent: retrying cannot run it twice
                last_error = exc
                await asyncio.sleep(0.05)
        # The destination is unreachable: if it adopted the request it is dead now, so
        # resuming here keeps the request running in exactly one place.
        raise MigrationAborted(AbortReason.DESTINATION_UNREACHABLE, str(last_error))

    async def _resume_here(self, m: _Migration) -> None:
        def resume(e: LLMEngine) -> None:
            if e.request_status(m.request_id) is RequestStatus.SUSPENDED:
                e.migration.resume_request(m.request_id)

        await self._engine.run(resume)
        if m.status is not MigrationStatus.ABORTED:
            m.set_status(MigrationStatus.ABORTED)

    async def _abort_remote(self, client, m: _Migration, reason: AbortReason | None) -> None:
        if m.status is not MigrationStatus.ABORTED:
            m.set_status(MigrationStatus.ABORTED)
        with contextlib.suppress(ConnectionError):  # else its lease frees the reservation
            await client.abort(m.migration_id, str(reason or "aborted_by_source"))
