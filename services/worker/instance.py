"""One worker instance: the engine thread, its output router and its llumlet, and the
bookkeeping that ties a request to the gateway that owns it and to its trace.

The servicer calls `submit` / `abort` / `load`; the engine thread calls `on_step`
(on the event loop) after every step.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

from opentelemetry import trace

from services.common.errors import AlreadyExistsError, ResourceExhaustedError, UnavailableError
from services.common.logging import bind_context, get_logger
from services.common.messages import FinishReason, LoadReport, OutputDelta, RequestSpec
from services.common.migration import MigrationMode, MigrationStatus
from services.worker.async_engine import AsyncEngine, EngineSnapshot, take_snapshot
from services.worker.engine import (
    DuplicateRequestError,
    LLMEngine,
    RequestOutput,
    RequestState,
)
from services.worker.kunserve import GroupMembership, KunServeConfig, MemberHooks, Role
from services.worker.kunserve.faults import NO_GROUP_FAULTS, GroupFaultHooks
from services.worker.llumlet import GroupReport, Llumlet
from services.worker.metrics import WorkerMetrics
from services.worker.migration import MigrationConfig, RequestHandoff
from services.worker.migration.faults import NO_FAULTS, FaultHooks
from services.worker.migration.service import MigrationHooks, WorkerMigration
from services.worker.migration.types import MigrationResult
from services.worker.output_router import OutputRouter
from services.worker.request_spans import RequestSpans
from services.worker.requests import engine_state

log = get_logger(__name__)

# A Submit that reaches a KunServe member while its group forms or dissolves waits this
# long for that to end (it takes well under a second) instead of being refused.
SUBMIT_WAIT_GROUP_S = 10.0
# The retry hint of a Submit refused for a full waiting queue (a few decode steps).
SUBMIT_RETRY_AFTER_S = 0.2


def delta_from_output(output: RequestOutput, failure: str | None = None) -> OutputDelta:
    """failure: why this worker gave the request up (its gateway then resumes it elsewhere)."""
    if not output.finished:
        return OutputDelta(output.request_id, output.first_token_index, tuple(output.new_token_ids))
    if output.finish_reason == "error":
        failure = failure or "engine step failed"
    reason = (
        FinishReason.ERROR
        if failure is not None
        else FinishReason.from_engine(output.finish_reason)
    )
    return OutputDelta(
        output.request_id,
        output.first_token_index,
        tuple(output.new_token_ids),
        reason,
        (failure or "") if reason is FinishReason.ERROR else "",
    )


class WorkerInstance:
    def __init__(
        self,
        engine: LLMEngine,
        llumlet: Llumlet,
        owner_unreachable_s: float,
        metrics: WorkerMetrics | None = None,
        max_waiting_requests: int | None = None,
        step_log: bool = False,
    ) -> None:
        """metrics: where this worker's Prometheus metrics go (None = not recorded);
        max_waiting_requests: Submit's bound on the engine's waiting queue (None = none)."""
        self.max_waiting_requests = max_waiting_requests
        self.instance_id = llumlet.spec.instance_id
        self.llumlet = llumlet
        self.router = OutputRouter(self.instance_id, owner_unreachable_s, self._abort_orphans)
        self.spans = RequestSpans()
        self.async_engine = AsyncEngine(
            engine, self.on_step, on_started=self.spans.on_started, step_log=step_log
        )
        self.metrics = metrics
        self._failures: dict[str, str] = {}  # request id -> why this worker gives it up
        self._tasks: set[asyncio.Task] = set()
        self.migration: WorkerMigration | None = None
        self.kunserve: GroupMembership | None = None

    def start(self) -> None:
        self.async_engine.start()

    def attach_migration(
        self, transport, config: MigrationConfig, faults: FaultHooks = NO_FAULTS
    ) -> WorkerMigration:
        """Live migration over `transport` (started); call after start()."""
        hooks = MigrationHooks(
            owner_of=self.router.owner_of,
            trace_context_of=self._trace_context_of,
            publish=self.router.publish,
            adopt=self._adopt,
            forget=self._forget,
            # A group member takes no migrations either: its KV is split across members.
            is_draining=lambda: self.llumlet.is_terminating or self._is_grouped(),
            on_count_changed=self._migration_count_changed,
            on_migrated=self._on_migrated,
        )
        self.migration = WorkerMigration(
            self.instance_id, self.async_engine, transport, config, hooks, faults
        )
        self.migration.start()
        return self.migration

    def attach_kunserve(
        self, transport, config: KunServeConfig, faults: GroupFaultHooks = NO_GROUP_FAULTS
    ) -> GroupMembership:
        """KunServe group membership over `transport` (started); call after start()."""
        hooks = MemberHooks(
            publish=self.router.publish,
            adopt=self._adopt,
            forget=self._forget,
            handoff_for=self._handoff_for,
            set_epoch=self._set_epoch,
            is_busy=self._why_busy,
            on_changed=self._group_changed,
            on_round_trip=self.metrics.on_round_trip if self.metrics else (lambda seconds: None),
        )
        self.kunserve = GroupMembership(
            self.instance_id, self.async_engine, transport, hooks, config, faults
        )
        return self.kunserve

    # ---- KunServe hooks ------------------------------------------------------------------

    def _is_grouped(self) -> bool:
        """In a group, joining one, or claimed by a PrepareJoin that just ran."""
        kunserve = self.kunserve
        return kunserve is not None and (kunserve.role is not Role.ALONE or kunserve.claimed)

    def _handoff_for(self, request_id: str, state: RequestState, moves: bool) -> RequestHandoff:
        """What travels with a request to another member; `moves`: its placement
        changes (the gateway follows the newer epoch)."""
        epochs = self.migration.epochs if self.migration is not None else {}
        epoch = epochs.get(request_id, 0)
        return RequestHandoff(
            state=state,
            owner_address=self.router.owner_of(request_id) or "",
            trace_context=self._trace_context_of(request_id),
            placement_epoch=epoch + 1 if moves else epoch,
        )

    def _set_epoch(self, request_id: str, epoch: int) -> None:
        if self.migration is not None and epoch > 0:
            self.migration.epochs[request_id] = epoch

    def _why_busy(self) -> str:
        if self.llumlet.is_terminating:
            return "draining"
        if self.migration is not None and self.migration.num_active:
            return f"{self.migration.num_active} migrations in flight"
        return ""

    def _group_changed(self) -> None:
        membership = self.kunserve
        spec = self.llumlet.spec
        if membership is None or membership.group is None or membership.role is Role.JOINING:
            self.llumlet.set_group(GroupReport(layer_start=0, layer_end=spec.num_layers))
            return
        me = membership.group.members[membership.stage]
        self.llumlet.set_group(
            GroupReport(
                membership.group.group_id,
                me.stage,
                me.layer_start,
                me.layer_end,
                membership.freed_weight_bytes,
            )
        )

    # ---- migration hooks ---------------------------------------------------------------

    def _trace_context_of(self, request_id: str) -> dict[str, str]:
        return self.spans.context_of(request_id)

    def _adopt(self, handoff: RequestHandoff) -> None:
        """A request migrated in: outputs go to its owner; its span continues its trace."""
        request_id = handoff.state.request_id
        self.router.register(request_id, handoff.owner_address)
        self.router.ledger.open(handoff.state)
        # A span left from an earlier stay here ends before this one starts.
        self.spans.end(request_id, {"llmesh.replaced": True})
        self.spans.start(
            request_id,
            handoff.trace_context,
            {
                "llmesh.request_id": request_id,
                "llmesh.instance_id": self.instance_id,
                "llmesh.migrated_in": True,
                "llmesh.num_computed_tokens": handoff.state.num_computed_tokens,
            },
            decoding=handoff.state.num_computed_tokens > 0,
        )

    def _forget(self, request_id: str) -> None:
        """A request migrated away (or its adoption failed): nothing more goes out here."""
        self.router.unregister(request_id)
        self.spans.end(request_id, {"llmesh.migrated_out": True})

    def _on_migrated(self, result: MigrationResult, mode: MigrationMode) -> None:
        if self.metrics is not None:
            self.metrics.on_migration(
                mode.value,
                result.status is MigrationStatus.COMMITTED,
                result.downtime_ms / 1000,
                result.duration_ms / 1000,
                result.num_bytes,
            )

    def metrics_view(self) -> tuple:
        """What the metrics read at scrape time (any thread): the engine's latest
        snapshot, data-plane bytes sent by class, the KunServe stage (-1 alone)."""
        membership = self.kunserve
        migration = self.migration
        try:
            sent = migration.transport.stats().num_bytes_sent_by_class if migration else {}
        except RuntimeError:  # not started, or closing: no data-plane series this scrape
            sent = {}
        return (
            self.async_engine.snapshot,
            sent,
            membership.stage
            if membership is not None and membership.role is not Role.ALONE
            else -1,
        )

    def _migration_count_changed(self) -> None:
        if self.migration is not None:
            self.llumlet.set_num_migrating(self.migration.num_active)

    # ---- requests ---------------------------------------------------------------------

    async def submit(self, spec: RequestSpec) -> None:
        """Admit a request (new, or resumed after a failover). Raises ValueError subclasses
        for bad input and AlreadyExistsError for an id already here."""
        kunserve = self.kunserve
        # A drop or a dissolve in progress decides in a moment whether this worker
        # takes requests (stage 0 of a serving group, or alone): wait for it.
        if (
            kunserve is not None
            and not kunserve.takes_requests
            and not (kunserve.is_changing and await kunserve.wait_settled(SUBMIT_WAIT_GROUP_S))
        ):
            raise UnavailableError(
                f"instance {self.instance_id} is a stage of KunServe group "
                f"{kunserve.group_id}; submit to its stage 0"
            )
        if spec.num_computed_tokens != 0:
            raise ValueError(
                f"state.num_computed_tokens={spec.num_computed_tokens} must be 0 (KV arrives only by migration)"
            )
        if self.spans.span_of(spec.request_id) is not None:
            # Refused before anything is replaced: the running request keeps its span
            # and its owner (the engine would refuse the import too).
            raise AlreadyExistsError(f"request {spec.request_id} is already on this instance")
        state = engine_state(spec)
        # Started before the engine sees it: the engine may begin its prefill at once.
        span = self.spans.start(
            spec.request_id,
            spec.trace_context,
            {
                "llmesh.request_id": spec.request_id,
                "llmesh.instance_id": self.instance_id,
                "llmesh.num_prompt_tokens": len(spec.prompt_token_ids),
                "llmesh.num_resumed_tokens": len(spec.output_token_ids),
            },
            decoding=False,
        )
        self.router.register(spec.request_id, spec.owner_address)
        self.router.ledger.open(state)
        # Reported as waiting from now on: the engine takes it only when its step ends.
        self.llumlet.note_arrived(
            spec.request_id, len(spec.prompt_token_ids) + len(spec.output_token_ids)
        )
        try:
            admitted_at = await self.async_engine.run(lambda engine: self._admit(engine, state))
        except DuplicateRequestError as exc:
            self.llumlet.note_refused(spec.request_id)
            self.spans.end(spec.request_id, {"llmesh.refused": "duplicate"})
            raise AlreadyExistsError(str(exc)) from None
        except BaseException:
            self.llumlet.note_refused(spec.request_id)
            self.router.unregister(spec.request_id)
            self.spans.end(spec.request_id, {"llmesh.refused": "error"})
            raise
        self.llumlet.note_admitted(spec.request_id, admitted_at)
        with trace.use_span(span), bind_context(request_id=spec.request_id):
            log.info(
                "request_admitted",
                owner=spec.owner_address,
                num_prompt_tokens=len(spec.prompt_token_ids),
                num_resumed_tokens=len(spec.output_token_ids),
            )

    async def rehome(
        self, request_id: str, owner_address: str, next_index: int
    ) -> tuple[RequestHandoff, FinishReason] | None:
        """Gateway failover: the request's outputs go to `owner_address` from now on.

        Returns the request with every token produced so far and how it finished, if it
        did (None if it is neither here nor finished here within the retention window);
        raises ValueError when the client claims more tokens than that. A migration of
        the request that already fixed its owner in the handoff is waited out first
        (the request is then here again, or at the destination: None here). After that
        no await: no step's outputs slip between the tokens returned and the first ones
        sent to the new owner, and no handoff is made with the old owner after it."""
        if self.migration is not None and self.migration.source.is_handing_over(request_id):
            with bind_context(request_id=request_id):
                log.info("rehome_waits_for_migration", owner=owner_address)
            await self.migration.source.wait_handed_over(request_id)
        entry = self.router.ledger.get(request_id)
        if entry is None:
            return None
        if next_index > len(entry.tokens):
            raise ValueError(
                f"next_index={next_index} is beyond the {len(entry.tokens)} tokens request "
                f"{request_id!r} has produced"
            )
        if not entry.is_finished:
            self.router.rehome(request_id, owner_address)
        epochs = self.migration.epochs if self.migration is not None else {}
        with bind_context(request_id=request_id):
            log.info(
                "request_rehomed",
                owner=owner_address,
                num_tokens=len(entry.tokens),
                is_finished=entry.is_finished,
            )
        handoff = RequestHandoff(
            state=replace(entry.state, output_token_ids=tuple(entry.tokens), num_computed_tokens=0),
            owner_address=owner_address,
            trace_context=self._trace_context_of(request_id),
            placement_epoch=epochs.get(request_id, 0),
        )
        return handoff, entry.finish_reason

    def _admit(self, engine: LLMEngine, state) -> float:
        """On the engine thread: queue the request unless the waiting queue is full; when
        (time.monotonic(): a snapshot taken later shows it)."""
        limit = self.max_waiting_requests
        if limit is not None and len(engine.scheduler.waiting) >= limit:
            raise ResourceExhaustedError(
                f"instance {self.instance_id} has {len(engine.scheduler.waiting)} requests "
                f"waiting (max_waiting_requests={limit}); retry later",
                SUBMIT_RETRY_AFTER_S,
            )
        engine.migration.import_request(state, [])
        self.async_engine.load_changed()
        return time.monotonic()

    async def abort(self, request_id: str) -> bool:
        """True if the request was here; its ABORT output follows with the next step."""
        aborted = await self.async_engine.run(lambda engine: engine.abort_request(request_id))
        with bind_context(request_id=request_id):
            log.info("request_abort", aborted=aborted)
        return aborted

    def _abort_orphans(self, request_ids: list[str]) -> None:
        """Their gateway is gone: nobody can receive the tokens."""
        for request_id in request_ids:
            self.router.unregister(request_id)
            self._spawn(self.abort(request_id))

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- engine thread callback -------------------------------------------------------

    def on_step(self, outputs: list[RequestOutput], snapshot: EngineSnapshot | None) -> None:
        if outputs:
            deltas = [delta_from_output(o, self._failures.pop(o.request_id, None)) for o in outputs]
            epochs = self.migration.epochs if self.migration is not None else None
            if epochs:  # requests that migrated in say which placement their tokens are from
                deltas = [
                    d._replace(placement_epoch=epochs[d.request_id])
                    if d.request_id in epochs
                    else d
                    for d in deltas
                ]
            self.router.publish(deltas)
            for delta in deltas:
                self.spans.on_tokens(delta.request_id, len(delta.token_ids))
                if delta.is_finished:
                    self._finish(delta)
        if snapshot is not None:
            self.llumlet.on_snapshot(snapshot)

    def _finish(self, delta: OutputDelta) -> None:
        self.router.unregister(delta.request_id)
        if self.migration is not None:
            self.migration.epochs.pop(delta.request_id, None)
        num_output_tokens = delta.first_token_index + len(delta.token_ids)
        span = self.spans.end(
            delta.request_id,
            {
                "llmesh.finish_reason": delta.finish_reason.value,
                "llmesh.num_output_tokens": num_output_tokens,
            },
        )
        if span is not None:
            with trace.use_span(span), bind_context(request_id=delta.request_id):
                log.info(
                    "request_finished",
                    finish_reason=delta.finish_reason.value,
                    num_output_tokens=num_output_tokens,
                )

    # ---- load -------------------------------------------------------------------------

    async def load(self, check_integrity: bool = False) -> LoadReport:
        """A fresh load report taken between two steps, optionally with the integrity check."""

        def take(engine: LLMEngine) -> tuple[EngineSnapshot, str]:
            error = ""
            if check_integrity:
                try:
                    engine.check_integrity()
                except AssertionError as exc:
                    error = str(exc) or type(exc).__name__
            return take_snapshot(engine), error

        snapshot, error = await self.async_engine.run(take)
        report = self.llumlet.next_report(snapshot)
        if check_integrity:
            report = replace(report, is_integrity_checked=True, integrity_error=error)
        return report

    async def stop(self) -> None:
        """Give every request here up (ERROR: the gateways resume them elsewhere), flush
        those last outputs, stop the engine thread and the output streams."""

        def give_up_all(engine: LLMEngine) -> int:
            request_ids = list(engine.scheduler.requests)
            for request_id in request_ids:
                self._failures[request_id] = "worker shutting down"
                engine.abort_request(request_id)
            return len(request_ids)

        try:
            num_given_up = await self.async_engine.run(give_up_all)
            await self.async_engine.run(lambda engine: None)  # after the step that emits them
        except RuntimeError:
            num_given_up = 0
        if num_given_up:
            log.info("requests_given_up_on_shutdown", num_requests=num_given_up)
        if self.kunserve is not None:
            await self.kunserve.close()
        if self.migration is not None:
            await self.migration.close()
        await self.async_engine.stop()
        await self.router.close()
        self.spans.end_all()
