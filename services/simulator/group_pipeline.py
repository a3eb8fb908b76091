"""A serving group's pipeline on the simulator's event loop: micro-batches through the
stages, activations over the links between them, tokens applied at the leader.

Kept apart from groups.py (which forms and restores groups) because stepping is the
hot path of a group's life and has its own timing rules; the two meet only at
`schedule` (a group formed, an exchange finished, a member was kicked) and at
`on_draining` (a draining group may dissolve once nothing is in flight).

    step      the leader forms micro-batches (engine.pipeline.form_micro_batch with
              the configured formation, lookahead or simple, as the live leader does,
              leaving out requests in flight or still exchanging); a micro-batch runs
              stage 0 .. g-1, each stage taking its member's cost-model time (its share
              of the layers), with hidden_size x tokens x dtype bytes over the link
              between stages; up to `micro_batches` are in flight; the last stage's
              tokens are applied at the leader (apply_micro_batch)
"""

from __future__ import annotations

from collections.abc import Callable

from services.simulator.group_state import GroupCost, GroupPhase, MicroBatchInFlight, SimGroup
from services.simulator.host import SharedHost
from services.simulator.instance import SimInstance
from services.simulator.loop import EventLoop
from services.worker.engine.outputs import RequestOutput


class GroupPipeline:
    """Steps every serving group's micro-batches.

    on_outputs(instance, outputs)   a leader applied a micro-batch: record its tokens
    on_preempted(request_ids)       forming a micro-batch preempted requests (recompute)
    on_draining(group)              a draining group was scheduled: it may dissolve
    """

    def __init__(
        self,
        loop: EventLoop,
        cost: GroupCost,
        *,
        micro_batches: int,
        on_outputs: Callable[[SimInstance, list[RequestOutput]], None],
        on_preempted: Callable[[list[str]], None],
        on_draining: Callable[[SimGroup], None],
        host: SharedHost | None = None,
        stage_overhead_s: float = 0.0,
    ) -> None:
        self.loop = loop
        self.cost = cost
        self.micro_batches = micro_batches  # 0: one per stage
        self.on_outputs = on_outputs
        self.on_preempted = on_preempted
        self.on_draining = on_draining
        # As an instance's steps: with a shared host (SimConfig.host_cores) a stage's
        # compute is a job on its cores, and the serving loop's overhead is added.
        self.host = host
        self.stage_overhead_s = stage_overhead_s

    def depth(self, group: SimGroup) -> int:
        """Micro-batches a group keeps in flight."""
        return self.micro_batches or group.num_stages

    def schedule(self, group: SimGroup) -> None:
        """Starts micro-batches while stage 0 is free and the pipeline has room."""
        if group.phase is GroupPhase.DRAINING:
            self.on_draining(group)
            return
        if group.phase not in (GroupPhase.SERVING, GroupPhase.RELOADING):
            return
        leader = group.leader.engine
        pipeline = leader.pipeline
        first = group.stages[0]
        depth = self.depth(group)
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
            mb = MicroBatchInFlight(
                batch, result.sampled_token_ids, stage_s, batch.num_batched_tokens
            )
            if group.num_in_flight == 0:
                group.active_since = self.loop.now
            group.num_in_flight += 1
            group.leader.touch()
            self._enter(group, 0, mb)

    def close_active(self, group: SimGroup) -> None:
        """Ends the group's current stretch of active time (nothing in flight, or the end)."""
        if group.active_since is not None:
            group.active_s += self.loop.now - group.active_since
            group.active_since = None

    def _enter(self, group: SimGroup, stage: int, mb: MicroBatchInFlight) -> None:
        st = group.stages[stage]
        st.queue.append(mb)
        if st.running is None:
            self._start_stage(group, stage)

    def _enter_call(self, arg: tuple[SimGroup, int, MicroBatchInFlight]) -> None:
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
                self.schedule(group)
            return
        leader = group.leader
        outputs = leader.engine.pipeline.apply_micro_batch(mb.batch, mb.sampled_token_ids)
        group.num_in_flight -= 1
        if group.num_in_flight == 0:
            self.close_active(group)
        leader.touch()
        self.on_outputs(leader, outputs)
        self.schedule(group)
