"""This worker as a member of a KunServe group: the handlers stage 0 calls on every
member (itself included), and what a member does when another one dies.

    PrepareJoin   ALONE -> JOINING       can it join? its pool, and the group blocks it holds
    JoinGroup     JOINING -> LEADER|STAGE  export every request (running ones with their
                                          group block ids = block_offset + old id), read the
                                          KV slices of the layers other members keep, drop
                                          the other layers, re-lay the kept ones; hand the
                                          requests to stage 0; stages > 0 start running
    Exchange      send the staged slices, receive and write the ones for this member's
                  layers, tell stage 0 per request (ExchangeDone)
    LeaveGroup    LEADER|STAGE -> ALONE  weights of the other layers from their owners, KV
                                          of the requests that go home here, every layer back
    AbortGroup /  any -> ALONE           a member died: reload the dropped layers locally,
    a peer lost                           drop the group's KV; stage 0 requeues every request
                                          to recompute (same tokens: seeded per position)

Stage 0's part (forming the group, dissolving it) is in leader.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from opentelemetry import trace

from kvtransport import Transport
from services.common.groups import ExchangePlan, GroupMember, GroupSpec, KVTransferSpec
from services.common.health_watch import watch_until_lost
from services.common.logging import get_logger
from services.common.messages import OutputDelta
from services.worker.async_engine import AsyncEngine
from services.worker.engine import LLMEngine, RequestState
from services.worker.kunserve.client import GrpcMember
from services.worker.kunserve.config import KunServeConfig
from services.worker.kunserve.exchange import KVExchange, kv_pieces
from services.worker.kunserve.faults import NO_GROUP_FAULTS, GroupFaultHooks
from services.worker.kunserve.leader import GroupLeader
from services.worker.kunserve.pipeline import StageRunner, to_host
from services.worker.kunserve.types import (
    GroupError,
    HandedRequest,
    JoinReply,
    PrepareReply,
    Role,
)
from services.worker.kunserve.weights import receive_weights, send_weights
from services.worker.migration import RequestHandoff

log = get_logger(__name__)
tracer = trace.get_tracer("llmesh.worker")

WORKER_SERVICE = "llmesh.v1.Worker"
SETTLE_POLL_S = 0.02


@dataclass
class MemberHooks:
    """What a group member needs from its worker instance."""

    publish: Callable[[list[OutputDelta]], None]  # outputs / notices to the gateways
    adopt: Callable[[RequestHandoff], None]  # a request now runs here: route its outputs
    forget: Callable[[str], None]  # a request left: nothing more goes out here for it
    handoff_for: Callable[[str, RequestState, bool], RequestHandoff]  # (id, state, moves)
    set_epoch: Callable[[str, int], None]  # placement epoch of a request running here
    is_busy: Callable[[], str]  # why it cannot join now ("" if it can)
    on_changed: Callable[[], None]  # role / layers changed: report load
    # Stage 0: seconds from sending a micro-batch's activations to its tokens' return.
    on_round_trip: Callable[[float], None] = lambda seconds: None


class GroupMembership:
    def __init__(
        self,
        instance_id: str,
        async_engine: AsyncEngine,
        transport: Transport,
        hooks: MemberHooks,
        config: KunServeConfig,
        faults: GroupFaultHooks = NO_GROUP_FAULTS,
    ) -> None:
        self.instance_id = instance_id
        self.faults = faults
        self.async_engine = async_engine
        self.transport = transport
        self.hooks = hooks
        self.config = config
        self.role = Role.ALONE
        # Set on the engine thread when PrepareJoin accepts, before the role is (on the
        # event loop): a migration reservation queued behind PrepareJoin on the engine
        # thread sees it and is refused (it would make the join fail).
        self.claimed = False
        self.group: GroupSpec | None = None
        self.stage = 0
        self.key = ""  # group id + epoch: prefix of the group's transfer ids
        self.freed_weight_bytes = 0
        self.kv_exchange: KVExchange | None = None
        self.runner: StageRunner | None = None
        self.leader = None  # a GroupLeader while this worker is stage 0 (leader.py)
        self._staged: dict[tuple[str, int], torch.Tensor] = {}  # (request, to stage) -> KV
        self._handed: tuple[HandedRequest, ...] = ()  # until stage 0 confirms adoption
        self._leaving: asyncio.Future | None = None  # a restore's transfers, while they run
        self._clients: dict[str, GrpcMember] = {}
        self._watches: list[asyncio.Task] = []
        self._tasks: set[asyncio.Task] = set()

    # ---- what the worker asks ---------------------------------------------------------

    @property
    def group_id(self) -> str:
        return self.group.group_id if self.group is not None else ""

    @property
    def is_changing(self) -> bool:
        """Dropping or dissolving: whether this worker takes requests is decided shortly."""
        leader = self.leader
        return (
            self.role in (Role.JOINING, Role.LEAVING)
            or (self.role is Role.LEADER and (leader is None or leader.driver is None))
            or (leader is not None and leader.is_restoring)
        )

    async def wait_settled(self, timeout_s: float) -> bool:
        """While a drop or a dissolve runs, wait (at most timeout_s) for it to end;
        True if this worker then takes requests."""
        deadline = time.monotonic() + timeout_s
        while self.is_changing and time.monotonic() < deadline:
            await asyncio.sleep(SETTLE_POLL_S)
        return self.takes_requests

    @property
    def takes_requests(self) -> bool:
        """Submits: alone, or as stage 0 of a group whose pipeline runs (not restoring)."""
        if self.role is Role.ALONE:
            return True
        leader = self.leader
        return (
            self.role is Role.LEADER
            and leader is not None
            and leader.driver is not None
            and not leader.is_restoring
        )

    def member_client(self, member: GroupMember) -> GrpcMember:
        client = self._clients.get(member.address)
        if client is None:
            client = self._clients[member.address] = GrpcMember(
                member.address, self.config.rpc_timeout_s
            )
        return client

    # ---- stage 0's entry points (leader.py does the work) -----------------------------

    async def form_group(self, group: GroupSpec) -> tuple[GroupSpec, int, float]:
        """FormGroup: this worker is stage 0. Returns (group, exchanging, drop ms)."""
        if group.leader.instance_id != self.instance_id:
            raise GroupError(f"{self.instance_id} is not stage 0 of group {group.group_id}")
        if self.role is not Role.ALONE:
            raise GroupError(f"{self.instance_id} is already in group {self.group_id}")
        self.leader = GroupLeader(self, group)
        try:
            return await self.leader.form()
        except BaseException:
            if self.role in (Role.ALONE, Role.JOINING):
                self.leader, self.role, self.group, self.claimed = None, Role.ALONE, None, False
            raise

    async def dissolve_group(self, group_id: str) -> tuple[int, int, float]:
        """DissolveGroup: (requests moved off stage 0, preempted, restore ms)."""
        self._require_group(group_id)
        if self.leader is None or self.role is not Role.LEADER:
            raise GroupError(f"{self.instance_id} is not stage 0 of group {group_id}")
        if self.leader.is_restoring:
            raise GroupError(f"group {group_id} is already restoring")
        return await self.leader.dissolve()

    async def exchange_done(self, group_id: str, request_id: str, stage: int, error: str) -> None:
        self._require_group(group_id)
        if self.leader is None:
            raise GroupError(f"{self.instance_id} is not stage 0 of group {group_id}")
        await self.leader.exchange_done(request_id, stage, error)

    # ---- PrepareJoin ------------------------------------------------------------------

    async def prepare_join(self, group: GroupSpec) -> PrepareReply:
        me = self._me(group)
        if self.role is not Role.ALONE:
            return PrepareReply(False, f"already in group {self.group_id} ({self.role.value})")
        busy = self.hooks.is_busy()
        if busy:
            return PrepareReply(False, busy)

        def numbers(engine: LLMEngine) -> PrepareReply:
            num_layers = engine.model_config.num_layers
            if group.members[-1].layer_end != num_layers:
                return PrepareReply(
                    False, f"the group's layers end at {group.members[-1].layer_end}, "
                    f"the model has {num_layers}",
                )  # fmt: skip
            if (engine.layer_start, engine.layer_end) != (0, num_layers):
                return PrepareReply(False, "this engine does not hold every layer")
            if engine.config.block_size != group.block_size:
                return PrepareReply(
                    False, f"block_size {engine.config.block_size} != group's {group.block_size}"
                )
            # Checked again here, between two steps: a migration that began after the
            # check above has its blocks reserved (or its request suspended) by now.
            stats = engine.stats()
            if stats.num_reserved_blocks or stats.num_suspended:
                return PrepareReply(
                    False,
                    f"a migration holds {stats.num_reserved_blocks} reserved blocks and "
                    f"{stats.num_suspended} suspended requests here",
                )
            self.claimed = True
            return PrepareReply(
                True,
                "",
                engine.block_manager.num_total_blocks,
                engine.layer_ranges.group_capacity(me.layer_start, me.layer_end),
            )

        reply = await self.async_engine.run(numbers)
        if reply.accepted:
            self.role, self.group, self.stage = Role.JOINING, group, me.stage
            self._spawn(self._expire_join(group.group_id))
        return reply

    async def _expire_join(self, group_id: str) -> None:
        """A stage 0 that died between PrepareJoin and JoinGroup must not leave this
        worker JOINING for good."""
        await asyncio.sleep(2 * self.config.rpc_timeout_s)
        if self.role is Role.JOINING and self.group_id == group_id:
            log.warning("group_join_expired", group_id=group_id)
            self.call_off_join(group_id)

    def call_off_join(self, group_id: str) -> None:
        """Stage 0 gave the drop up before JoinGroup: back to ALONE."""
        if self.role is Role.JOINING and self.group_id == group_id:
            self.role, self.group, self.claimed = Role.ALONE, None, False

    # ---- JoinGroup --------------------------------------------------------------------

    async def join_group(self, group: GroupSpec, block_offset: int, epoch: str) -> JoinReply:
        if self.role is not Role.JOINING or self.group_id != group.group_id:
            raise GroupError(f"{self.instance_id} is not joining group {group.group_id}")
        me = self._me(group)
        others = [m for m in group.members if m.stage != me.stage]

        def drop(engine: LLMEngine):
            cpu_start = time.thread_time()  # the join's own cost (bench burst's simulator)
            # Before anything is exported: a join that cannot complete must leave every
            # request where it is (stage 0's abort then tells the others).
            stats = engine.stats()
            if stats.num_reserved_blocks or stats.num_suspended:
                raise GroupError(
                    f"{self.instance_id} cannot join: a migration holds "
                    f"{stats.num_reserved_blocks} reserved blocks and {stats.num_suspended} "
                    "suspended requests"
                )
            exported: list[tuple[RequestState, tuple[int, ...]]] = []
            staged: dict[tuple[str, int], torch.Tensor] = {}
            for request in list(engine.scheduler.running):
                request_id = request.request_id
                block_ids = engine.migration.request_block_ids(request_id)
                state = engine.migration.export_request_state(request_id)
                if state.num_computed_tokens > 0:
                    for m in others:  # slices of the layers another member keeps
                        data = engine.migration.read_kv_layers(
                            block_ids, m.layer_start, m.layer_end
                        )
                        staged[(request_id, m.stage)] = to_host(data)
                exported.append((state, tuple(block_offset + b for b in block_ids)))
            exported += [
                (engine.migration.export_request_state(r.request_id), ())
                for r in engine.scheduler.waiting
            ]
            for state, _ in exported:
                engine.migration.remove_request(state.request_id)
            change = engine.layer_ranges.join_group(
                me.layer_start, me.layer_end, group.num_group_blocks, block_offset
            )
            return exported, staged, change, time.thread_time() - cpu_start

        with tracer.start_as_current_span(
            "kunserve.drop",
            attributes={"llmesh.group_id": group.group_id, "llmesh.stage": me.stage},
        ) as span:
            await self.faults.before_join(group.group_id, me.stage)
            exported, staged, change, join_cpu_s = await self.async_engine.run(drop)
            span.set_attribute("llmesh.freed_weight_bytes", change.freed_weight_nbytes)
            span.set_attribute("llmesh.num_requests", len(exported))
        self._staged = staged
        self.freed_weight_bytes = change.freed_weight_nbytes
        self.key = f"{group.group_id}.{epoch}"
        self.kv_exchange = KVExchange(self.transport, self.config.transfer_timeout_s)
        is_leader = me.stage == 0
        moves = not is_leader  # a stage > 0 hands its requests to stage 0
        handed = tuple(
            HandedRequest(self.hooks.handoff_for(state.request_id, state, moves), block_ids)
            for state, block_ids in exported
        )
        if moves:
            self.announce_moves(handed, group.leader)
            self._handed = handed
        self.group = group
        self.role = Role.LEADER if is_leader else Role.STAGE
        if not is_leader:
            self._start_runner(group, me)
        self._watch_members(group)
        self.hooks.on_changed()
        log.info(
            "group_joined",
            group_id=group.group_id,
            stage=me.stage,
            layers=f"[{me.layer_start},{me.layer_end})",
            num_requests=len(handed),
            freed_weight_bytes=change.freed_weight_nbytes,
            num_group_blocks=group.num_group_blocks,
            join_cpu_ms=round(join_cpu_s * 1e3, 3),
        )
        return JoinReply(handed, change.freed_weight_nbytes)

    def announce_moves(self, handed: tuple[HandedRequest, ...], to: GroupMember) -> None:
        """Tell each request's gateway that it runs on `to` now (it follows it there)."""
        notices = [
            OutputDelta(
                request_id=h.handoff.state.request_id,
                first_token_index=len(h.handoff.state.output_token_ids),
                token_ids=(),
                moved_to_instance_id=to.instance_id,
                moved_to_address=to.address,
                placement_epoch=h.handoff.placement_epoch,
            )
            for h in handed
        ]
        self.hooks.publish(notices)
        for h in handed:
            self.hooks.forget(h.handoff.state.request_id)

    def _start_runner(self, group: GroupSpec, me: GroupMember) -> None:
        is_last = me.stage == group.num_stages - 1
        next_member = group.leader if is_last else group.members[me.stage + 1]
        self.runner = StageRunner(
            self.key,
            me.stage,
            group.num_stages,
            self.transport,
            self.async_engine.run,
            next_member.transport_address,
            self.async_engine.engine.config.device,
            on_failure=lambda exc: self.lost(f"pipeline transfer failed: {exc}"),
            exchange=self.kv_exchange,
        )
        self.runner.start()

    # ---- Exchange (drop) ----------------------------------------------------------------

    async def exchange(self, plan: ExchangePlan) -> None:
        """Send the staged slices, post the receives of this member's layers."""
        group = self._require_group(plan.group_id)
        await self.faults.before_exchange(plan.group_id, self.stage)
        exchange = self.kv_exchange
        assert exchange is not None
        self._handed = ()  # stage 0 adopted them: they are its to save from here on
        for spec in plan.sends:
            data = self._staged.pop((spec.request_id, spec.to_stage), None)
            if data is None:
                raise GroupError(f"no staged KV of {spec.request_id} for stage {spec.to_stage}")
            self._spawn(self._send_staged(spec, group.members[spec.to_stage], data))
        self._staged.clear()  # whatever stage 0 did not ask for (finished meanwhile)
        for spec in plan.receives:
            exchange.receive(spec, self._write_slices, self._received)

    async def _send_staged(self, spec: KVTransferSpec, to: GroupMember, data) -> None:
        await self.faults.before_exchange_send(spec)
        if self.kv_exchange is not None:  # None: the group is gone meanwhile
            self.kv_exchange.send(spec, to.transport_address, data)

    async def _write_slices(self, spec: KVTransferSpec, data: torch.Tensor) -> None:
        """Into the pool beside the steps, a piece per thread hop (activations run in
        between): no micro-batch touches a request whose exchange is not done (stage 0
        holds it back)."""
        engine = self.async_engine.engine
        for piece in kv_pieces(spec, data):
            await asyncio.to_thread(
                engine.migration.write_kv_blocks,
                piece.block_ids,
                piece.data,  # host memory: write_kv_blocks stages it onto a GPU
                piece.layer,
            )

    async def _received(self, spec: KVTransferSpec, error: str) -> None:
        group = self.group
        if group is None:
            return
        if self.leader is not None:
            await self.leader.exchange_done(spec.request_id, spec.to_stage, error)
            return
        try:
            await self.member_client(group.leader).exchange_done(
                group.group_id, spec.request_id, spec.to_stage, error
            )
        except Exception as exc:  # noqa: BLE001 - stage 0 gone: the monitor dissolves
            log.warning("exchange_done_not_delivered", request_id=spec.request_id, error=str(exc))

    # ---- LeaveGroup (restore) ----------------------------------------------------------

    async def leave_group(
        self, group_id: str, plan: ExchangePlan, requests: tuple[HandedRequest, ...]
    ) -> int:
        """Every layer back: weights from their owners, the KV of the requests that go
        home here from the other members; then those requests run here.

        Two phases. The transfers can fail or be cut short (a member dies: the monitor
        cancels them); then this member reloads its layers from its own source and
        still takes `requests`, to recompute their KV (their gateways already follow
        them here), and raises GroupError. Once every byte is here, the switch to the
        full engine runs to its end, uncancelled."""
        group = self._require_group(group_id)
        me = group.members[self.stage]
        self.role = Role.LEAVING
        await self._stop_pipeline()
        with tracer.start_as_current_span(
            "kunserve.restore", attributes={"llmesh.group_id": group_id, "llmesh.stage": me.stage}
        ) as span:
            self._leaving = asyncio.ensure_future(self._restore_transfers(group, me, plan))
            try:
                weights, inbound = await self._leaving
            except BaseException as exc:
                reason = "cut short" if isinstance(exc, asyncio.CancelledError) else str(exc)
                await self._reload_alone(f"restore transfers failed: {reason}", requests)
                raise GroupError(
                    f"restore of {group_id} failed on {self.instance_id}: {reason}"
                ) from None
            finally:
                self._leaving = None
            # This member's own layers of the requests that go home here move inside
            # its pool: {group block id: new local block id}.
            moves = {
                g: h for r in requests for g, h in zip(r.group_block_ids, r.block_ids, strict=True)
            }

            def restore(e: LLMEngine) -> int:
                change = e.layer_ranges.leave_group(moves, weights)
                for spec in plan.receives:
                    e.migration.write_kv_blocks(
                        list(spec.dst_block_ids),
                        inbound[spec.transfer_id],  # staged onto a GPU by write_kv_blocks
                        spec.layer_start,
                    )
                for r in requests:
                    if r.block_ids:
                        e.migration.import_request_at(r.handoff.state, list(r.block_ids))
                    else:
                        e.migration.import_request(r.handoff.state, [])
                return change.weight_nbytes_after - change.weight_nbytes_before

            handoffs = [r.handoff for r in requests]
            self._route_here(handoffs)
            try:
                restored = await asyncio.shield(self.async_engine.run(restore))
            except BaseException:
                self._unroute(handoffs)
                raise
            span.set_attribute("llmesh.restored_weight_bytes", restored)
            span.set_attribute("llmesh.num_requests", len(requests))
        await self.faults.after_restore_import(group_id)
        await self._become_alone()
        log.info("group_left", group_id=group_id, num_requests=len(requests))
        return restored

    async def _restore_transfers(
        self, group: GroupSpec, me: GroupMember, plan: ExchangePlan
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Send this member's KV of requests going home elsewhere and its layers' weights;
        receive the others'. Returns (weights by HF name, KV by transfer id)."""
        await self.faults.before_restore_transfers(group.group_id)
        # Outbound KV first: these blocks are gone once the layers come back.
        outbound = await self.async_engine.run(
            lambda e: [
                (s, to_host(e.migration.read_kv_layers(list(s.src_block_ids), s.layer_start,
                                                       s.layer_end)))
                for s in plan.sends
            ]
        )  # fmt: skip
        exchange = KVExchange(self.transport, self.config.transfer_timeout_s)
        inbound: dict[str, torch.Tensor] = {}
        failures: list[str] = []

        async def keep(spec: KVTransferSpec, data: torch.Tensor) -> None:
            inbound[spec.transfer_id] = data.clone()  # the pooled buffer goes back

        def note(spec: KVTransferSpec, error: str) -> None:
            if error:
                failures.append(f"{spec.transfer_id}: {error}")

        try:
            for spec in plan.receives:
                exchange.receive(spec, keep, note)
            for spec, data in outbound:
                exchange.send(spec, group.members[spec.to_stage].transport_address, data, note)
            weights = await self._swap_weights(group, me)
            if not await exchange.wait_idle(self.config.transfer_timeout_s * 2) or failures:
                raise GroupError(f"KV transfers failed: {failures or 'timed out'}")
        finally:
            await exchange.close()
        return weights, inbound

    async def _reload_alone(self, reason: str, requests: tuple[HandedRequest, ...]) -> None:
        """This member's own way back to every layer (its host copy or its weight
        source), with an empty pool; `requests` then queue here to recompute."""
        log.warning(
            "group_reload_alone",
            group_id=self.group_id,
            reason=reason,
            num_requests=len(requests),
        )

        def reload(engine: LLMEngine) -> None:
            for request_id in list(engine.scheduler.requests):
                engine.migration.remove_request(request_id)
            if not engine.layer_ranges.is_complete:
                engine.layer_ranges.leave_group({})
            for r in requests:
                engine.migration.import_request(replace(r.handoff.state, num_computed_tokens=0), [])

        self._route_here([r.handoff for r in requests])
        await asyncio.shield(self.async_engine.run(reload))
        await self._become_alone()

    def _route_here(self, handoffs: list[RequestHandoff], adopt: bool | None = None) -> None:
        """Before requests run here: their placement epochs and (`adopt`; default: unless
        this is stage 0, which routes them already) their owners. Done before the engine
        imports them, which may step them at once: a token published before its owner is
        known would go nowhere, and the gateway would wait for it forever."""
        adopt = self.stage != 0 if adopt is None else adopt
        for handoff in handoffs:
            self.hooks.set_epoch(handoff.state.request_id, handoff.placement_epoch)
            if adopt:
                self.hooks.adopt(handoff)

    def _unroute(self, handoffs: list[RequestHandoff]) -> None:
        if self.stage != 0:
            for handoff in handoffs:
                self.hooks.forget(handoff.state.request_id)

    async def _swap_weights(self, group: GroupSpec, me: GroupMember) -> dict[str, torch.Tensor]:
        """Send this member's layers to every other member; receive theirs."""
        held = await self.async_engine.run(
            lambda e: {n: to_host(t) for n, t in e.layer_ranges.export_weights().items()}
        )
        others = [m for m in group.members if m.stage != me.stage]
        sends = [
            send_weights(self.transport, m.transport_address, f"w/{self.key}/{me.stage}-{m.stage}",
                         held)
            for m in others
        ]  # fmt: skip
        receives = [
            receive_weights(
                self.transport, f"w/{self.key}/{m.stage}-{me.stage}", self.config.transfer_timeout_s
            )
            for m in others
        ]
        results = await asyncio.gather(*sends, *receives)
        weights: dict[str, torch.Tensor] = {}
        for part in results[len(sends) :]:
            weights.update(part)
        return weights

    # ---- faults -------------------------------------------------------------------------

    def lost(self, reason: str) -> None:
        """A member died (or the pipeline broke): leave the group at once, in the
        background (called from callbacks). During a restore: cut its transfers short
        (leave_group then reloads this member alone)."""
        if self.role is Role.LEAVING:
            if self._leaving is not None:
                log.warning("group_restore_cut_short", group_id=self.group_id, reason=reason)
                self._leaving.cancel()
            return
        if self.role is Role.ALONE:
            return
        task = asyncio.ensure_future(self.abort(reason, tell_others=True))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def abort(self, reason: str, tell_others: bool = False, group_id: str = "") -> None:
        """Reload every dropped layer from this worker's own source, drop the group's KV.
        Stage 0 keeps every request and requeues it to recompute; a stage > 0 whose
        requests stage 0 never adopted takes them back the same way."""
        group = self.group
        if group is None or self.role is Role.ALONE:
            return
        if group_id and group_id != group.group_id:
            return  # about a group this worker already left
        if self.role is Role.JOINING:  # nothing dropped yet
            self.call_off_join(group.group_id)
            return
        log.warning("group_abort", group_id=group.group_id, stage=self.stage, reason=reason)
        was_leader = self.role is Role.LEADER or self.leader is not None
        self.role = Role.LEAVING
        await self._stop_pipeline()
        if self.kv_exchange is not None:
            await self.kv_exchange.close()
        reclaimed = self._handed
        self._handed, self._staged = (), {}

        def reload(engine: LLMEngine) -> int:
            states = []
            if was_leader:
                for request in list(engine.scheduler.requests.values()):
                    states.append(engine.migration.remove_request(request.request_id))
            if not engine.layer_ranges.is_complete:
                engine.layer_ranges.leave_group({})  # weights: host copy, else the source
            for state in states + [h.handoff.state for h in reclaimed]:
                engine.migration.import_request(replace(state, num_computed_tokens=0), [])
            return len(states) + len(reclaimed)

        # Back here: the gateway follows the newer epoch.
        self._route_here(
            [replace(h.handoff, placement_epoch=h.handoff.placement_epoch + 1) for h in reclaimed],
            adopt=True,
        )
        with tracer.start_as_current_span(
            "kunserve.abort", attributes={"llmesh.group_id": group.group_id, "reason": reason}
        ):
            num_requeued = await self.async_engine.run(reload)
        if tell_others:
            for m in group.members:
                if m.stage != self.stage:
                    self._spawn(self._tell_abort(m, group.group_id, reason))
        await self._become_alone()
        log.info("group_aborted", group_id=group.group_id, num_requeued=num_requeued)

    async def _tell_abort(self, member: GroupMember, group_id: str, reason: str) -> None:
        with contextlib.suppress(Exception):
            await self.member_client(member).abort_group(group_id, reason)

    def _watch_members(self, group: GroupSpec) -> None:
        for m in group.members:
            if m.instance_id != self.instance_id:
                self._watches.append(asyncio.ensure_future(self._watch(m)))

    async def _watch(self, member: GroupMember) -> None:
        reason = await watch_until_lost(
            self.member_client(member).channel,
            member.address,
            WORKER_SERVICE,
            self.config.watch_rotate_s,
        )
        self.lost(f"member {member.instance_id} (stage {member.stage}) lost: {reason}")

    # ---- helpers ------------------------------------------------------------------------

    async def _stop_pipeline(self) -> None:
        if self.runner is not None:
            await self.runner.close()
            self.runner = None
        if self.leader is not None:
            await self.leader.stop_driver()

    async def _become_alone(self) -> None:
        current = asyncio.current_task()
        for task in self._watches:
            if task is not current:
                task.cancel()
        self._watches = []
        if self.kv_exchange is not None:
            await self.kv_exchange.close()
            self.kv_exchange = None
        self.role, self.group, self.leader, self.key = Role.ALONE, None, None, ""
        self.claimed = False
        self.freed_weight_bytes = 0
        self.hooks.on_changed()

    def _me(self, group: GroupSpec) -> GroupMember:
        try:
            return group.member(self.instance_id)
        except KeyError:
            raise GroupError(f"{self.instance_id} is not a member of {group.group_id}") from None

    def _require_group(self, group_id: str) -> GroupSpec:
        if self.group is None or self.group.group_id != group_id:
            raise GroupError(f"{self.instance_id} is not in group {group_id}")
        return self.group

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in [*self._watches, *self._tasks]:
            task.cancel()
        await asyncio.gather(*self._watches, *self._tasks, return_exceptions=True)
        await self._stop_pipeline()
        if self.kv_exchange is not None:
            await self.kv_exchange.close()
        for client in self._clients.values():
            await client.close()
