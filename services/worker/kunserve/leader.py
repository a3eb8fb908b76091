"""Stage 0 of a group: forms it, schedules for it, dissolves it.

Drop (FormGroup, from the scheduler):

    1. PrepareJoin on every member (itself included): each says its pool (N_r blocks of
       all layers) and the group blocks its memory holds keeping only its layers.
    2. The group pool: num_group_blocks = min over members; member r's old block i is
       group block offset_r + i, offset_r = N_0 + ... + N_{r-1}, so nothing collides:

           group ids  [0 ........ N_0)[N_0 ...... N_0+N_1) ... [sum N ..... num_group_blocks)
                       member 0's       member 1's               free from the start

    3. JoinGroup on every member: each drops its other layers and hands its requests
       over; stage 0 adopts them all (running ones at their group ids) and becomes the
       group's scheduler (PipelineDriver as its engine's stepper). Capacity is usable now.
    4. Exchange on every member: each running request's KV slices go to the members
       that keep those layers; the request is held back until all arrived
       (ExchangeDone); new requests and exchanged ones run meanwhile.

Restore (DissolveGroup): let the exchange finish, drain the pipeline, give each running
request a home member with room in its full pool (the others are preempted and
recompute), then LeaveGroup on every member: weights and KV move, every member holds
every layer again, and each request runs on its home.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from dataclasses import replace

import grpc
from opentelemetry import trace

from services.common.groups import ExchangePlan, GroupSpec, GroupStatus, KVTransferSpec
from services.common.logging import get_logger
from services.common.tracing import context_from_dict
from services.worker.engine import (
    GroupCapacityError,
    LLMEngine,
    MicroBatchCost,
    MicroBatchFormation,
    get_profile,
    plan_group_pool,
)
from services.worker.kunserve.pipeline import PipelineDriver
from services.worker.kunserve.types import GroupError, HandedRequest, JoinReply, Role

log = get_logger(__name__)
tracer = trace.get_tracer("llmesh.worker")

DRAIN_POLL_S = 0.005


class GroupLeader:
    def __init__(self, membership, group: GroupSpec) -> None:
        self.m = membership  # this worker's GroupMembership (stage 0)
        self.group = group
        self.driver: PipelineDriver | None = None
        self.is_restoring = False
        self.num_blocks_alone: dict[int, int] = {}  # stage -> pool before the drop
        # Requests whose KV exchange is running: request id -> stages still to confirm.
        self.pending: dict[str, set[int]] = {}
        self.failed: set[str] = set()
        self._exchange_spans: dict[str, trace.Span] = {}

    # ---- drop ----------------------------------------------------------------------------

    async def form(self) -> tuple[GroupSpec, int, float]:
        """Runs the drop; returns (group, requests still exchanging, drop ms)."""
        started = time.perf_counter()
        group, m = self.group, self.m
        members = {mem.stage: self._client(mem) for mem in group.members}
        with tracer.start_as_current_span(
            "kunserve.form_group",
            attributes={"llmesh.group_id": group.group_id, "llmesh.num_stages": group.num_stages},
        ) as span:
            replies = await asyncio.gather(
                *(c.prepare_join(group) for c in members.values()), return_exceptions=True
            )
            refusals = [
                f"stage {s}: {r if isinstance(r, BaseException) else r.reason}"
                for s, r in zip(members, replies, strict=True)
                if isinstance(r, BaseException) or not r.accepted
            ]
            if not refusals:
                try:
                    pool = plan_group_pool(
                        [r.num_blocks for r in replies],
                        [r.num_group_blocks_possible for r in replies],
                    )
                except GroupCapacityError as exc:
                    refusals.append(str(exc))
            if refusals:
                await self._call_off(members)
                raise GroupError(f"group {group.group_id} refused: " + "; ".join(refusals))
            self.num_blocks_alone = {s: r.num_blocks for s, r in zip(members, replies, strict=True)}
            num_group_blocks, offsets = pool.num_group_blocks, pool.block_offsets
            total = sum(self.num_blocks_alone.values())
            group = replace(group, num_group_blocks=num_group_blocks, num_blocks_before=total)
            epoch = uuid.uuid4().hex[:8]
            joins = await asyncio.gather(
                *(c.join_group(group, offsets[s], epoch) for s, c in members.items()),
                return_exceptions=True,
            )
            failed = [
                f"stage {s}: {j}" for s, j in zip(members, joins, strict=True) if isinstance(j, BaseException)
            ]  # fmt: skip
            if failed:
                reason = "join failed: " + "; ".join(failed)
                if m.role is Role.JOINING:
                    # Stage 0's own join failed (it exported nothing): the members that
                    # joined reload and take back the requests they handed it.
                    await self._call_off(members, reason)
                else:
                    # Whoever joined reloads; stage 0 requeues what it was handed.
                    self.m.lost(reason)
                raise GroupError(f"group {group.group_id} failed to form: " + "; ".join(failed))
            joined = dict(zip(members, joins, strict=True))
            freed = sum(j.freed_weight_bytes for j in joined.values())
            group = replace(group, status=GroupStatus.SERVING, freed_weight_bytes=freed)
            self.group = m.group = group
            await self._adopt(joined)
            plans = self._exchange_plans(joined)
            started_exchanges = await asyncio.gather(
                *(members[s].exchange(plans[s]) for s in members), return_exceptions=True
            )
            failed = [
                f"stage {s}: {_reason(e)}"
                for s, e in zip(members, started_exchanges, strict=True)
                if isinstance(e, BaseException)
            ]
            if failed:
                # A member died between joining and its exchange: the group breaks up as
                # on any member loss (every request requeued, nothing lost).
                self.m.lost("exchange failed to start: " + "; ".join(failed))
                raise GroupError(
                    f"group {group.group_id} formed but its KV exchange failed to start: "
                    + "; ".join(failed)
                )
            drop_ms = (time.perf_counter() - started) * 1000
            span.set_attribute("llmesh.freed_weight_bytes", freed)
            span.set_attribute("llmesh.num_group_blocks", num_group_blocks)
            span.set_attribute("llmesh.drop_ms", drop_ms)
        log.info(
            "group_formed",
            group_id=group.group_id,
            num_stages=group.num_stages,
            num_group_blocks=num_group_blocks,
            num_blocks_before=total,
            freed_weight_bytes=freed,
            num_exchanging=len(self.pending),
            drop_ms=round(drop_ms, 1),
        )
        return group, len(self.pending), drop_ms

    def _client(self, member):
        """Stage 0 calls itself in-process, the others over gRPC."""
        return self.m if member.stage == 0 else self.m.member_client(member)

    async def _call_off(self, members, reason: str = "drop called off") -> None:
        for stage, client in members.items():
            if stage == 0:
                self.m.call_off_join(self.group.group_id)
            else:
                # A member still JOINING goes back to ALONE (if it does not hear this,
                # its JOINING times out on its own); one that joined reloads.
                with contextlib.suppress(Exception):
                    await client.abort_group(self.group.group_id, reason)

    async def _adopt(self, joined: dict[int, JoinReply]) -> None:
        """Every member's requests into stage 0's engine, at their group block ids; the
        running ones with KV wait for their exchange. Then the pipeline starts."""
        m, group = self.m, self.group
        needs_exchange = {
            r.handoff.state.request_id
            for stage, reply in joined.items()
            for r in reply.requests
            if r.block_ids and r.handoff.state.num_computed_tokens > 0
        }
        self.pending = {
            request_id: {s for s in range(group.num_stages)} for request_id in needs_exchange
        }
        origin = {
            r.handoff.state.request_id: stage
            for stage, reply in joined.items()
            for r in reply.requests
        }
        trace_contexts = {
            r.handoff.state.request_id: r.handoff.trace_context
            for reply in joined.values()
            for r in reply.requests
        }
        drop_span = trace.get_current_span().get_span_context()
        for request_id in needs_exchange:  # the origin already holds its own layers
            self.pending[request_id].discard(origin[request_id])
            # In the request's trace (one request, one trace), linked to the drop.
            self._exchange_spans[request_id] = tracer.start_span(
                "kunserve.exchange",
                context=context_from_dict(trace_contexts.get(request_id)),
                links=[trace.Link(drop_span)] if drop_span.is_valid else (),
                attributes={"llmesh.request_id": request_id, "llmesh.group_id": group.group_id},
            )
        for stage, reply in joined.items():
            if stage == 0:
                continue
            for r in reply.requests:
                m.hooks.set_epoch(r.handoff.state.request_id, r.handoff.placement_epoch)
                m.hooks.adopt(r.handoff)
        engine_config = m.async_engine.engine.config
        cost = MicroBatchCost.from_profile(get_profile(m.config.cost_profile))
        formation = MicroBatchFormation(
            m.config.micro_batching,
            num_micro_batches=m.config.max_in_flight or group.num_stages,
            max_num_seqs=engine_config.max_num_seqs,
            max_num_batched_tokens=engine_config.max_num_batched_tokens,
            cost=cost,
            min_chunk_tokens=m.config.min_chunk_tokens,
        )
        driver = PipelineDriver(
            m.key,
            m.transport,
            group.members[1].transport_address,
            asyncio.get_running_loop(),
            m.async_engine.wakeup,
            num_stages=group.num_stages,
            formation=formation,
            cost=cost,
            on_failure=lambda exc: m.lost(f"pipeline transfer failed: {exc}"),
            exchange=m.kv_exchange,
            on_round_trip=m.hooks.on_round_trip,
        )

        def adopt(engine: LLMEngine) -> None:
            for reply in joined.values():
                for r in reply.requests:
                    if r.block_ids:
                        engine.migration.import_request_at(r.handoff.state, list(r.block_ids))
                    else:
                        engine.migration.import_request(r.handoff.state, [])
            driver.held_back = set(needs_exchange)
            m.async_engine.stepper = driver

        await m.async_engine.run(adopt)
        self.driver = driver  # stage 0 takes submits from here on
        driver.start()

    def _exchange_plans(self, joined: dict[int, JoinReply]) -> dict[int, ExchangePlan]:
        group = self.group
        sends: dict[int, list[KVTransferSpec]] = {s: [] for s in joined}
        receives: dict[int, list[KVTransferSpec]] = {s: [] for s in joined}
        for origin, reply in joined.items():
            for r in reply.requests:
                request_id = r.handoff.state.request_id
                if request_id not in self.pending:
                    continue
                for to in group.members:
                    if to.stage == origin:
                        continue
                    spec = KVTransferSpec(
                        f"kvx/{self.m.key}/{request_id}/{origin}-{to.stage}",
                        request_id,
                        origin,
                        to.stage,
                        r.block_ids,
                        r.block_ids,
                        to.layer_start,
                        to.layer_end,
                    )
                    sends[origin].append(spec)
                    receives[to.stage].append(spec)
        return {
            s: ExchangePlan(group.group_id, tuple(sends[s]), tuple(receives[s])) for s in joined
        }

    async def exchange_done(self, request_id: str, stage: int, error: str) -> None:
        """A member has (or failed to get) its slices of the request."""
        stages = self.pending.get(request_id)
        if stages is None:
            return
        stages.discard(stage)
        if error:
            self.failed.add(request_id)
        if stages:
            return
        del self.pending[request_id]
        is_failed = request_id in self.failed
        self.failed.discard(request_id)
        span = self._exchange_spans.pop(request_id, None)
        driver = self.driver

        def release(engine: LLMEngine) -> None:
            if is_failed:  # part of its KV never arrived: recompute it
                request = engine.scheduler.requests.get(request_id)
                if request is not None and request.num_computed_tokens > 0:
                    engine.scheduler.preempt(request)
            if driver is not None:
                driver.held_back.discard(request_id)

        await self.m.async_engine.run(release)
        if span is not None:
            span.set_attribute("llmesh.failed", is_failed)
            span.end()

    # ---- restore -------------------------------------------------------------------------

    async def dissolve(self) -> tuple[int, int, float]:
        """Runs the restore; returns (requests moved off stage 0, preempted, restore ms)."""
        started = time.perf_counter()
        group, m = self.group, self.m
        self.is_restoring = True
        self.group = m.group = group.with_status(GroupStatus.RESTORING)
        with tracer.start_as_current_span(
            "kunserve.dissolve_group", attributes={"llmesh.group_id": group.group_id}
        ) as span:
            await self._finish_exchange()
            await self._drain()
            bubble = None  # what the formation did over the group's life
            pipeline: dict = {}  # stage 0's own figures (bench burst's simulator side)
            if self.driver is not None:
                stats = self.driver.stats
                bubble = round(stats.modelled_bubble_fraction, 4)
                pipeline = stats.summary()
                span.set_attribute("llmesh.micro_batching", self.driver.formation.name)
                span.set_attribute("llmesh.num_micro_batches", stats.num_micro_batches)
                span.set_attribute("llmesh.modelled_bubble_fraction", bubble)
            placed, moved, preempted = await m.async_engine.run(self._plan_homes)
            homes: dict[int, list[HandedRequest]] = {mem.stage: [] for mem in group.members}
            for stage, state, local, group_ids in placed:
                handoff = m.hooks.handoff_for(state.request_id, state, stage != 0)
                homes[stage].append(HandedRequest(handoff, local, group_ids))
            plans = self._restore_plans(homes)
            requests = {s: tuple(handed) for s, handed in homes.items()}
            for stage, handed in requests.items():
                if stage != 0 and handed:
                    m.announce_moves(handed, group.members[stage])
            results = await asyncio.gather(
                *(
                    self._client(mem).leave_group(group.group_id, plans[mem.stage],
                                                  requests[mem.stage])
                    for mem in group.members
                ),
                return_exceptions=True,
            )  # fmt: skip
            failed = [
                (mem, r) for mem, r in zip(group.members, results, strict=True)
                if isinstance(r, BaseException)
            ]  # fmt: skip
            for member, error in failed:
                # It reloaded alone and recomputes the requests homed there (or it is
                # dead, and their gateways resume them elsewhere).
                log.warning(
                    "group_restore_member_failed",
                    group_id=group.group_id,
                    stage=member.stage,
                    error=str(error),
                )
                preempted += len(requests[member.stage])
            restore_ms = (time.perf_counter() - started) * 1000
            span.set_attribute("llmesh.num_moved", moved)
            span.set_attribute("llmesh.num_preempted", preempted)
            span.set_attribute("llmesh.restore_ms", restore_ms)
        log.info(
            "group_dissolved",
            group_id=group.group_id,
            modelled_bubble_fraction=bubble,
            num_moved=moved,
            num_preempted=preempted,
            restore_ms=round(restore_ms, 1),
            **pipeline,
        )
        return moved, preempted, restore_ms

    async def _finish_exchange(self) -> None:
        deadline = time.monotonic() + self.m.config.transfer_timeout_s
        while self.pending and time.monotonic() < deadline:
            await asyncio.sleep(DRAIN_POLL_S * 4)
        for request_id in list(self.pending):  # never arrived: recompute them
            for stage in list(self.pending.get(request_id, ())):
                await self.exchange_done(request_id, stage, "restore: exchange unfinished")

    async def _drain(self) -> None:
        driver = self.driver
        assert driver is not None

        def pause(engine: LLMEngine) -> int:
            driver.is_paused = True
            return driver.num_in_flight

        deadline = time.monotonic() + self.m.config.rpc_timeout_s
        while await self.m.async_engine.run(pause):
            if time.monotonic() > deadline:
                raise GroupError(f"group {self.group.group_id}: the pipeline did not drain")
            await asyncio.sleep(DRAIN_POLL_S)

    def _plan_homes(self, engine: LLMEngine):
        """On the engine thread: each running request's home (the member with the most
        room left in its full pool that fits it; preempted if none does) and its new
        local block ids there. Every request leaves stage 0's group engine; returns
        [(home stage, state, local ids, group ids)] (waiting ones: home 0, no ids)."""
        room = dict(self.num_blocks_alone)
        next_free = {s: 0 for s in room}
        placed = []
        moved = preempted = 0
        for request in sorted(engine.scheduler.running, key=lambda r: r.seq_no):
            request_id = request.request_id
            block_ids = tuple(engine.migration.request_block_ids(request_id))
            stage = max(room, key=lambda s: (room[s], -s))
            if room[stage] < len(block_ids):
                engine.scheduler.preempt(request)
                preempted += 1
                continue
            local = tuple(range(next_free[stage], next_free[stage] + len(block_ids)))
            next_free[stage] += len(block_ids)
            room[stage] -= len(block_ids)
            placed.append((stage, engine.migration.remove_request(request_id), local, block_ids))
            moved += stage != 0
        for request in list(engine.scheduler.waiting):  # queued ones stay here
            placed.append((0, engine.migration.remove_request(request.request_id), (), ()))
        self.m.async_engine.stepper = None
        return placed, moved, preempted

    def _restore_plans(self, homes: dict[int, list[HandedRequest]]) -> dict[int, ExchangePlan]:
        group = self.group
        sends: dict[int, list[KVTransferSpec]] = {s: [] for s in homes}
        receives: dict[int, list[KVTransferSpec]] = {s: [] for s in homes}
        for home, handed in homes.items():
            for h in handed:
                if not h.group_block_ids:
                    continue
                request_id = h.handoff.state.request_id
                for frm in group.members:
                    if frm.stage == home:
                        continue
                    spec = KVTransferSpec(
                        f"kvr/{self.m.key}/{request_id}/{frm.stage}-{home}",
                        request_id,
                        frm.stage,
                        home,
                        h.group_block_ids,
                        h.block_ids,
                        frm.layer_start,
                        frm.layer_end,
                    )
                    sends[frm.stage].append(spec)
                    receives[home].append(spec)
        return {s: ExchangePlan(group.group_id, tuple(sends[s]), tuple(receives[s])) for s in homes}

    async def stop_driver(self) -> None:
        driver, self.driver = self.driver, None
        if driver is None:
            return
        await driver.close()

        def detach(engine: LLMEngine) -> None:
            if self.m.async_engine.stepper is driver:
                self.m.async_engine.stepper = None
            driver.drop_in_flight(engine)

        await self.m.async_engine.run(detach)


def _reason(error: BaseException) -> str:
    """One line for a member's failure: a gRPC status and its details, or the error."""
    if isinstance(error, grpc.aio.AioRpcError):
        return f"{error.code().name}: {error.details()}"
    return str(error) or type(error).__name__
