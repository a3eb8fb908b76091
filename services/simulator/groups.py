"""KunServe in the simulator: instances that drop their replicated layers and serve
as one pipeline, and restore.

Every member is a simulated engine, and the group uses the engine's own machinery
(services/worker/engine/layer_ranges.py, pipeline.py), as the live worker does:

    form      members finish their step and their migrations; each hands every request
              over (remove_request); capacities = layer_ranges.group_capacity(stage's
              layers); pool = plan_group_pool(...); every member join_group(...); the
              leader (stage 0) adopts member r's running requests at group blocks
              offset_r + old id (import_request_at), the queued ones as new
    exchange  a running request from member r sends the KV of the layers r no longer
              holds over r's link (blocks x bytes per block-layer x those layers);
              activations take the link first (the exchange pauses while one is
              sent); a request waits only for its own exchange (`exclude` below)
    step      micro-batches through the stages (group_pipeline.py)
    restore   the dropped weights reload over the link while the pipeline serves; then
              no new micro-batch starts; once none is in flight and no exchange is
              pending, the leader hands every request over, every member
              leave_group(...); running requests go home to the member with the most
              free blocks (reserved there, imported when the other stages' KV slices
              arrived), queued ones are dispatched again; a running request no member
              can hold recomputes (counted as a preemption)

A group is one instance to the dispatcher: the leader's load is the group's pool.

This module is a group's life: the policy's tick, forming with its KV exchange, restore
and dissolve. Forming and restoring stay together because both change who belongs to
which group (`groups`, `by_member`) and tell the policy; the state they change is in
group_state.py (GroupPhase: FORMING -> SERVING -> RELOADING -> DRAINING -> DISSOLVED),
and stepping a serving group is group_pipeline.py's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from services.policies import InstanceLoad
from services.policies.groups import split_layers
from services.policies.kunserve import GroupPolicy
from services.policies.microbatch import PipelineClock
from services.simulator.group_pipeline import GroupPipeline
from services.simulator.group_state import (
    GroupCost,
    GroupPhase,
    GroupStats,
    PipelineStage,
    SimGroup,
)
from services.simulator.host import SharedHost
from services.simulator.instance import SimInstance
from services.simulator.link import Link
from services.simulator.loop import EventLoop
from services.worker.engine.micro_batching import MicroBatchFormation
from services.worker.engine.outputs import RequestOutput
from services.worker.engine.pipeline import plan_group_pool
from services.worker.engine.request import RequestState


class GroupManager:
    """Forms and restores groups on the simulator's event loop; `pipeline` steps them.

    on_outputs(instance, outputs)   a leader applied a micro-batch: record its tokens
    on_preempted(request_ids)       requests lost their KV (recompute)
    dispatch(state)                 a queued request to dispatch again (restore)
    kick(instance)                  an instance alone again may step
    """

    def __init__(
        self,
        loop: EventLoop,
        policy: GroupPolicy,
        cost: GroupCost,
        *,
        formation: MicroBatchFormation,  # with its cost model, either name
        micro_batches: int,
        on_outputs: Callable[[SimInstance, list[RequestOutput]], None],
        on_preempted: Callable[[list[str]], None],
        dispatch: Callable[[RequestState], None],
        kick: Callable[[SimInstance], None],
        host: SharedHost | None = None,
        stage_overhead_s: float = 0.0,
    ) -> None:
        self.loop = loop
        self.policy = policy
        self.cost = cost
        self.formation = formation  # num_micro_batches is set per group
        self.pipeline = GroupPipeline(
            loop,
            cost,
            micro_batches=micro_batches,
            on_outputs=on_outputs,
            on_preempted=on_preempted,
            on_draining=self._maybe_dissolve,
            host=host,
            stage_overhead_s=stage_overhead_s,
        )
        self.on_preempted = on_preempted
        self.host = host
        self.dispatch = dispatch
        self.kick_instance = kick
        self.groups: dict[str, SimGroup] = {}  # not dissolved
        self.by_member: dict[str, SimGroup] = {}
        self.stats = GroupStats()
        self.num_returning = 0  # requests between the group and their home member
        self._next_id = 0

    # ---- the group tick -------------------------------------------------------------

    def tick(self, instances: Sequence[SimInstance]) -> None:
        """Runs the policy on the instances alone and the serving groups' leaders."""
        now = self.loop.now
        loads: list[InstanceLoad] = []
        for instance in instances:
            group = self.by_member.get(instance.instance_id)
            if group is None or (group.phase is GroupPhase.SERVING and instance is group.leader):
                loads.append(instance.load())
        decision = self.policy.decide(loads, now)
        by_id = {inst.instance_id: inst for inst in instances}
        for member_ids in decision.drops:
            members = [by_id[i] for i in member_ids]
            if all(m.instance_id not in self.by_member and not m.is_terminating for m in members):
                self.start_forming(members)
        for group_id in decision.restores:
            group = self.groups.get(group_id)
            if group is not None and group.phase is GroupPhase.SERVING:
                self.start_restore(group)
        for group in list(self.groups.values()):
            if group.phase is GroupPhase.FORMING:
                self._try_form(group)

    # ---- forming --------------------------------------------------------------------

    def start_forming(self, members: Sequence[SimInstance]) -> SimGroup:
        """Marks the members; the group forms once every one of them is between steps
        and in no migration (now, if they already are)."""
        self._next_id += 1
        self.stats.decided_times_s.append(self.loop.now)
        num_layers = members[0].engine.model_config.num_layers
        group = SimGroup(
            f"g{self._next_id:02d}",
            list(members),
            split_layers(num_layers, len(members)),
        )
        self.groups[group.group_id] = group
        for stage, member in enumerate(members):
            self.by_member[member.instance_id] = group
            member.group_id, member.group_stage = group.group_id, stage
            member.touch()
        self._try_form(group)
        return group

    def kick(self, instance: SimInstance) -> None:
        """The simulator's kick for a member: form, or run the pipeline."""
        group = self.by_member[instance.instance_id]
        if group.phase is GroupPhase.FORMING:
            self._try_form(group)
        elif instance is group.leader:
            self.pipeline.schedule(group)

    def steps_alone(self, instance: SimInstance) -> bool:
        """Whether a forming group's member still steps alone (two-phase join: it
        prepares at a boundary, steps on, joins at its next boundary after all prepared)."""
        group = self.by_member[instance.instance_id]
        if not self.cost.two_phase_join or group.phase is not GroupPhase.FORMING:
            return False
        member_id = instance.instance_id
        if member_id in group.joining:
            return False
        if instance.is_busy or instance.num_migrating:
            return True  # not between steps (or refused while migrating): no call runs
        if member_id not in group.prepared:
            group.prepared.add(member_id)
            if len(group.prepared) < group.num_stages:
                return True
            group.all_prepared = True
            # Members with nothing to step join at once (after this boundary's step
            # started, if it has one).
            self.loop.at(self.loop.now, self._join_idle, group)
            if instance is not group.leader:
                return True  # JoinGroup comes over the network: it steps on meanwhile
            # Stage 0 prepared last: its own JoinGroup is a local call, which live
            # reaches its engine thread before the next step starts (5 of 7 such drops
            # in the recorded bench burst runs; the other 2 stepped once more).
            group.joining.add(member_id)
            self._run_join(group, instance)
            return False
        if not group.all_prepared:
            return True
        group.joining.add(member_id)
        self._run_join(group, instance)
        return False

    def _join_idle(self, group: SimGroup) -> None:
        for member in group.members:
            if member.instance_id not in group.joining and not member.is_busy:
                group.joining.add(member.instance_id)
                self._run_join(group, member)

    def _try_form(self, group: SimGroup) -> None:
        if self.cost.two_phase_join:
            if not group.prepared:  # just decided: members between steps prepare now
                for member in group.members:
                    if not member.is_busy:
                        self.kick_instance(member)
            return  # the members' boundaries drive it (steps_alone); _joined forms it
        if self.cost.join_s > 0:
            # Each member joins at its own step boundary (its engine call between two
            # steps); the group forms when the last join is done.
            for member in group.members:
                if member.instance_id not in group.joining and not (
                    member.is_busy or member.num_migrating
                ):
                    group.joining.add(member.instance_id)
                    self._run_join(group, member)
            if group.num_joined < group.num_stages:
                return
        elif any(m.is_busy or m.num_migrating for m in group.members):
            return
        self._form(group)

    def _run_join(self, group: SimGroup, member: SimInstance) -> None:
        if self.host is None:
            self.loop.at(self.loop.now + self.cost.join_s, self._joined, group)
        else:
            self.host.run(("join", member.instance_id), self.cost.join_s, self._joined, group)

    def _joined(self, group: SimGroup) -> None:
        group.num_joined += 1
        if group.num_joined == group.num_stages:
            self._form(group)

    def _form(self, group: SimGroup) -> None:
        now, cost = self.loop.now, self.cost
        exported: list[tuple[int, RequestState, list[int]]] = []
        for stage, member in enumerate(group.members):
            engine = member.engine
            for request in [*engine.scheduler.running, *engine.scheduler.waiting]:
                block_ids = list(engine.block_manager.block_ids(request.request_id))
                exported.append(
                    (stage, engine.migration.remove_request(request.request_id), block_ids)
                )
        pool = plan_group_pool(
            [m.block_manager.num_total_blocks for m in group.members],
            [
                m.engine.layer_ranges.group_capacity(start, end)
                for m, (start, end) in zip(group.members, group.layer_ranges, strict=True)
            ],
        )
        for stage, (member, (start, end)) in enumerate(
            zip(group.members, group.layer_ranges, strict=True)
        ):
            member.engine.layer_ranges.join_group(
                start, end, pool.num_group_blocks, pool.block_offsets[stage]
            )
            member.touch()
        group.num_group_blocks = pool.num_group_blocks
        group.stages = [PipelineStage() for _ in group.members]
        depth = self.pipeline.depth(group)
        group.formation = dataclasses.replace(self.formation, num_micro_batches=depth)
        group.clock = PipelineClock(group.num_stages, depth, is_recording=False)
        group.links = [Link(self.loop, cost.bandwidth_bytes_per_s) for _ in group.members]
        leader = group.leader.engine.migration
        num_layers = group.leader.engine.model_config.num_layers
        for stage, state, block_ids in exported:
            if not block_ids:
                leader.import_request(state, [])
                continue
            leader.import_request_at(state, pool.group_block_ids(stage, block_ids))
            start, end = group.layer_ranges[stage]
            nbytes = len(block_ids) * cost.kv_bytes_per_block_layer * (num_layers - (end - start))
            if nbytes > 0 and state.num_computed_tokens > 0:
                group.exchanging[state.request_id] = now
                self.stats.num_exchanged_requests += 1
                self.stats.exchange_bytes += nbytes
                group.links[stage].send_kv(
                    nbytes, _Call(self._exchanged, (group, state.request_id))
                )
        group.set_phase(GroupPhase.SERVING)
        group.formed_s = now
        self.stats.num_drops += 1
        self.stats.drop_times_s.append(now)
        self.policy.note_formed(group.group_id, now)
        group.leader.touch()
        self.pipeline.schedule(group)

    def _exchanged(self, arg: tuple[SimGroup, str]) -> None:
        group, request_id = arg
        since = group.exchanging.pop(request_id)
        self.stats.max_exchange_wait_s = max(self.stats.max_exchange_wait_s, self.loop.now - since)
        self.pipeline.schedule(group)

    # ---- restore --------------------------------------------------------------------

    def start_restore(self, group: SimGroup) -> None:
        """Reloads the dropped weights over the link (the pipeline serves meanwhile),
        then drains and dissolves."""
        group.set_phase(GroupPhase.RELOADING)
        reload_s = 0.0
        for member in group.members:
            layers = member.engine.layer_ranges
            full = layers.held.weight_nbytes(0, layers.model_config.num_layers)
            reload_s = max(
                reload_s, (full - layers.weight_nbytes) / self.cost.bandwidth_bytes_per_s
            )
        self.loop.at(self.loop.now + reload_s, self._reloaded, group)

    def _reloaded(self, group: SimGroup) -> None:
        group.set_phase(GroupPhase.DRAINING)
        self._maybe_dissolve(group)

    def _maybe_dissolve(self, group: SimGroup) -> None:
        if group.num_in_flight == 0 and not group.exchanging:
            self._dissolve(group)

    def _dissolve(self, group: SimGroup) -> None:
        now, cost = self.loop.now, self.cost
        self._account(group)
        leader = group.leader.engine
        running = sorted(
            leader.scheduler.running,
            key=lambda r: (-len(leader.block_manager.block_ids(r.request_id)), r.arrival_time),
        )
        moving = [
            (r.request_id, len(leader.block_manager.block_ids(r.request_id))) for r in running
        ]
        moved = [(leader.migration.remove_request(rid), n) for rid, n in moving]
        queued = [
            leader.migration.remove_request(r.request_id) for r in list(leader.scheduler.waiting)
        ]
        for member in group.members:
            member.engine.layer_ranges.leave_group({})
            del self.by_member[member.instance_id]
            member.group_id, member.group_stage = "", 0
            member.touch()
        group.set_phase(GroupPhase.DISSOLVED)
        del self.groups[group.group_id]
        self.stats.num_restores += 1
        self.policy.note_restored([m.instance_id for m in group.members], now)
        for state, num_blocks in moved:
            home = max(group.members, key=lambda m: m.block_manager.num_free_blocks)
            if home.block_manager.num_free_blocks < num_blocks:  # nobody can take its KV
                self.stats.num_restore_recomputes += 1
                self.on_preempted([state.request_id])
                queued.append(dataclasses.replace(state, num_computed_tokens=0))
                continue
            block_ids = home.engine.migration.reserve_blocks(num_blocks)
            home.touch()
            self.num_returning += 1
            pending = _Returning(self, home, state, block_ids, 0)
            for stage, (start, end) in enumerate(group.layer_ranges):
                if group.members[stage] is home:
                    continue
                pending.num_pieces += 1
                nbytes = num_blocks * cost.kv_bytes_per_block_layer * (end - start)
                group.links[stage].send_kv(nbytes, pending.piece_done)
            if pending.num_pieces == 0:
                pending.arrive()
        for state in sorted(queued, key=lambda s: s.arrival_time):
            self.dispatch(state)
        for member in group.members:
            self.kick_instance(member)

    def _account(self, group: SimGroup) -> None:
        self.pipeline.close_active(group)
        self.stats.stage_busy_s += sum(min(st.busy_s, group.active_s) for st in group.stages)
        self.stats.stage_total_s += group.num_stages * group.active_s
        if group.clock is not None:
            self.stats.modelled_busy_s += group.clock.busy_s
            self.stats.modelled_stage_time_s += group.num_stages * group.clock.makespan_s

    def finish(self) -> None:
        """End of the run: count the groups still formed."""
        for group in self.groups.values():
            if group.phase is not GroupPhase.FORMING:
                self._account(group)


@dataclass
class _Returning:
    """A request going home after a restore: imported once every piece arrived."""

    manager: GroupManager
    home: SimInstance
    state: RequestState
    block_ids: list[int]
    num_pieces: int

    def piece_done(self) -> None:
        self.num_pieces -= 1
        if self.num_pieces == 0:
            self.arrive()

    def arrive(self) -> None:
        self.home.import_request(self.state, self.block_ids)
        self.manager.num_returning -= 1
        self.manager.kick_instance(self.home)


@dataclass(frozen=True)
class _Call:
    fn: Callable
    arg: object

    def __call__(self) -> None:
        self.fn(self.arg)
