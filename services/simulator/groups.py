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
    step      the leader forms micro-batches (engine.pipeline.form_micro_batch with
              the configured formation, lookahead or simple, as the live leader does,
              leaving out requests in flight or still exchanging); a micro-batch runs
              stage 0 .. g-1, each stage taking its member's cost-model time (its share
              of the layers), with hidden_size x tokens x dtype bytes over the link
              between stages; up to `micro_batches` are in flight; the last stage's
              tokens are applied at the leader (apply_micro_batch)
    restore   the dropped weights reload over the link while the pipeline serves; then
              no new micro-batch starts; once none is in flight and no exchange is
              pending, the leader hands every request over, every member
              leave_group(...); running requests go home to the member with the most
              free blocks (reserved there, imported when the other stages' KV slices
              arrived), queued ones are dispatched again; a running request no member
              can hold recomputes (counted as a preemption)

A group is one instance to the dispatcher: the leader's load is the group's pool.

    GroupPhase:  FORMING -> SERVING -> RELOADING -> DRAINING -> DISSOLVED
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from services.policies import InstanceLoad
from services.policies.groups import split_layers
from services.policies.kunserve import GroupPolicy
from services.policies.microbatch import PipelineClock
from services.simulator.host import SharedHost
from services.simulator.instance import SimInstance
from services.simulator.link import Link
from services.simulator.loop import EventLoop
from services.worker.engine.micro_batching import MicroBatchFormation
from services.worker.engine.outputs import RequestOutput
from services.worker.engine.pipeline import plan_group_pool
from services.worker.engine.request import RequestState
from services.worker.engine.scheduler import SchedulerOutput


class GroupPhase(enum.Enum):
    """FORMING -> SERVING -> RELOADING -> DRAINING -> DISSOLVED."""

    FORMING = "forming"  # members finish their step and migrations, then join
    SERVING = "serving"
    RELOADING = "reloading"  # restore decided: weights come back, the pipeline still serves
    DRAINING = "draining"  # no new micro-batches; dissolves when nothing is in flight
    DISSOLVED = "dissolved"


_NEXT_PHASE = {
    GroupPhase.FORMING: GroupPhase.SERVING,
    GroupPhase.SERVING: GroupPhase.RELOADING,
    GroupPhase.RELOADING: GroupPhase.DRAINING,
    GroupPhase.DRAINING: GroupPhase.DISSOLVED,
}


@dataclass(frozen=True)
class GroupCost:
    """What moving KV, activations and weights between members costs."""

    bandwidth_bytes_per_s: float  # each member's link
    kv_bytes_per_block_layer: int  # K and V of one block in one layer
    activation_bytes_per_token: int  # hidden_size x dtype bytes
    hop_latency_s: float = 0.0  # fixed cost of one activation hand-off


@dataclass
class GroupStats:
    num_drops: int = 0  # groups formed
    num_restores: int = 0  # groups dissolved
    num_exchanged_requests: int = 0
    exchange_bytes: int = 0
    max_exchange_wait_s: float = 0.0  # longest a request waited for its own exchange
    num_restore_recomputes: int = 0  # running requests no member could take back
    # Bubbles as the run had them: idle stage time while a micro-batch was in flight
    # (links, exchanges and late arrivals included), over every group and stage.
    stage_busy_s: float = 0.0
    stage_total_s: float = 0.0  # g x active time, over every group
    # Bubbles of the formation alone, as the live leader reports them: every group's
    # micro-batches timed back to back by the cost model (policies.microbatch).
    modelled_busy_s: float = 0.0
    modelled_stage_time_s: float = 0.0  # g x each group's modelled makespan, summed

    @property
    def bubble_fraction(self) -> float:
        """Idle / total stage time while the pipeline had work, in simulated time."""
        if self.stage_total_s <= 0:
            return 0.0
        return 1.0 - self.stage_busy_s / self.stage_total_s

    @property
    def modelled_bubble_fraction(self) -> float:
        """Idle / total stage time of the micro-batches formed, back to back."""
        if self.modelled_stage_time_s <= 0:
            return 0.0
        return 1.0 - self.modelled_busy_s / self.modelled_stage_time_s


@dataclass
class _MicroBatch:
    batch: SchedulerOutput
    sampled_token_ids: list[int]
    stage_s: list[float]  # each stage's compute time
    num_tokens: int


@dataclass
class _Stage:
    queue: deque[_MicroBatch] = field(default_factory=deque)
    running: _MicroBatch | None = None
    busy_s: float = 0.0


@dataclass
class SimGroup:
    group_id: str
    members: list[SimInstance]  # stage order
    layer_ranges: list[tuple[int, int]]
    phase: GroupPhase = GroupPhase.FORMING
    formed_s: float = math.nan
    num_group_blocks: int = 0
    stages: list[_Stage] = field(default_factory=list)
    links: list[Link] = field(default_factory=list)
    exchanging: dict[str, float] = field(default_factory=dict)  # request id -> since
    num_in_flight: int = 0
    active_since: float | None = None
    active_s: float = 0.0
    formation: MicroBatchFormation | None = None
    clock: PipelineClock | None = None  # the formation's modelled timing

    @property
    def leader(self) -> SimInstance:
        return self.members[0]

    @property
    def num_stages(self) -> int:
        return len(self.members)

    def set_phase(self, phase: GroupPhase) -> None:
        if _NEXT_PHASE.get(self.phase) is not phase:
            raise AssertionError(f"group {self.group_id}: {self.phase} -> {phase}")
        self.phase = phase


class GroupManager:
    """Forms, steps and restores groups on the simulator's event loop.

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
        # As an instance's steps: with a shared host (SimConfig.host_cores) a stage's
        # compute is a job on its cores, and the serving loop's overhead is added.
        self.host = host
        self.stage_overhead_s = stage_overhead_s
        self.policy = policy
        self.cost = cost
        self.formation = formation  # num_micro_batches is set per group
        self.micro_batches = micro_batches  # 0: one per stage
        self.on_outputs = on_outputs
        self.on_preempted = on_preempted
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
            self._schedule(group)

    def _try_form(self, group: SimGroup) -> None:
        if any(m.is_busy or m.num_migrating for m in group.members):
            return
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
        group.stages = [_Stage() for _ in group.members]
        depth = self._depth(group)
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
        self.policy.note_formed(group.group_id, now)
        group.leader.touch()
        self._schedule(group)

    def _exchanged(self, arg: tuple[SimGroup, str]) -> None:
        group, request_id = arg
        since = group.exchanging.pop(request_id)
        self.stats.max_exchange_wait_s = max(self.stats.max_exchange_wait_s, self.loop.now - since)
        self._schedule(group)

    # ---- the pipeline ---------------------------------------------------------------

    def _depth(self, group: SimGroup) -> int:
        return self.micro_batches or group.num_stages

    def _schedule(self, group: SimGroup) -> None:
        """Starts micro-batches while stage 0 is free and the pipeline has room."""
        if group.phase is GroupPhase.DRAINING:
            self._maybe_dissolve(group)
            return
        if group.phase not in (GroupPhase.SERVING, GroupPhase.RELOADING):
            return
        leader = group.leader.engine
        pipeline = leader.pipeline
        first = group.stages[0]
        depth = self._depth(group)
        assert group.formation is not None and group.formation.cost is not None
        assert group.clock is not None
        while first.running is None and not first.queue and group.num_in_flight < depth:
            batch = pipeline.form_micro_batch(group.formation, group.exchanging)
            if batch.preempted_request_ids:
                self.on_preempted(list(batch.preempted_request_ids))
                group.leader.touch()
            if batch.is_empty:
                if batch.preempted_request_ids:
                    continue  # it freed blocks: try again
                break
            result = leader.executor.execute(batch)
            group.clock.add(group.formation.cost.batch_s(batch) / group.num_stages)
            stage_s = [m.engine.executor.step_time(batch) for m in group.members]
            mb = _MicroBatch(batch, result.sampled_token_ids, stage_s, batch.num_batched_tokens)
            if group.num_in_flight == 0:
                group.active_since = self.loop.now
            group.num_in_flight += 1
            group.leader.touch()
            self._enter(group, 0, mb)

    def _enter(self, group: SimGroup, stage: int, mb: _MicroBatch) -> None:
        st = group.stages[stage]
        st.queue.append(mb)
        if st.running is None:
            self._start_stage(group, stage)

    def _enter_call(self, arg: tuple[SimGroup, int, _MicroBatch]) -> None:
        self._enter(*arg)

    def _start_stage(self, group: SimGroup, stage: int) -> None:
        st = group.stages[stage]
        mb = st.queue.popleft()
        st.running = mb
        duration_s = mb.stage_s[stage] + self.stage_overhead_s
        st.busy_s += duration_s
        if self.host is None:
            self.loop.at(self.loop.now + duration_s, self._stage_done, (group, stage))
        else:
            key = group.members[stage].instance_id  # a member runs no step of its own
            self.host.run(key, duration_s, self._stage_done, (group, stage))

    def _stage_done(self, arg: tuple[SimGroup, int]) -> None:
        group, stage = arg
        st = group.stages[stage]
        mb, st.running = st.running, None
        assert mb is not None
        if st.queue:
            self._start_stage(group, stage)
        if stage + 1 < group.num_stages:
            delay = group.links[stage].send_activation(
                mb.num_tokens * self.cost.activation_bytes_per_token
            )
            self.loop.at(
                self.loop.now + delay + self.cost.hop_latency_s,
                self._enter_call,
                (group, stage + 1, mb),
            )
            if stage == 0:
                self._schedule(group)
            return
        leader = group.leader
        outputs = leader.engine.pipeline.apply_micro_batch(mb.batch, mb.sampled_token_ids)
        group.num_in_flight -= 1
        if group.num_in_flight == 0:
            self._close_active(group)
        leader.touch()
        self.on_outputs(leader, outputs)
        self._schedule(group)

    def _close_active(self, group: SimGroup) -> None:
        if group.active_since is not None:
            group.active_s += self.loop.now - group.active_since
            group.active_since = None

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
        self._close_active(group)
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
