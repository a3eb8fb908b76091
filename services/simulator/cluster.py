"""The cluster simulator: N instances, the global scheduler's loops, virtual time.

What runs on the event loop:

    arrival         (after `dispatch_latency_s`) dispatch policy over fresh load
                    snapshots -> instance queue
    step end        engine update (tokens, finishes), last-stage hand-offs, next step
    migration tick  every MigrationConfig.interval_s: pair -> select -> migrate;
                    terminating instances hand their queued requests back to dispatch
    scaling tick    every ScalingConfig.interval_s: up (instance ready after
                    `instance_startup_s`) or down (mark terminating, drain, remove)
    group tick      every GroupConfig.interval_s (group policy other than "none"): the
                    KunServe policy drops groups of instances into pipelines and
                    restores them (groups.py; group_pipeline.py steps a group's micro-batches)

Instances advance independently: each has its own step timeline from the cost model.
With `host_cores` set (the fidelity bench's one-machine mesh) steps, request paths and
token streaming share that many cores instead (host.py).
Load snapshots are exact at decision time (the live mesh sees ~50 ms old reports).

This module is what runs on the event loop; what the config builds before the run is
assembly.py's, each request's books are ledger.py's, and what a run returns is
result.py's, so that each reads on its own.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from services.policies import DispatchInfo, ScaleAction, make_group_policy
from services.simulator import assembly
from services.simulator.config import SimConfig
from services.simulator.group_state import GroupStats
from services.simulator.groups import GroupManager
from services.simulator.host import SharedHost
from services.simulator.instance import TOKEN_ID, SimInstance
from services.simulator.ledger import RequestLedger
from services.simulator.loop import EventLoop
from services.simulator.metrics import summarize
from services.simulator.migration import MigrationManager, SimMigration
from services.simulator.profiles import SimProfile, get_profile
from services.simulator.result import SimResult, SimulationError
from services.simulator.workload import SimRequest
from services.worker.engine.outputs import RequestOutput
from services.worker.engine.request import RequestState


class Simulator:
    def __init__(
        self,
        config: SimConfig,
        requests: Sequence[SimRequest],
        profile: SimProfile | None = None,
    ) -> None:
        self.config = config
        self.profile = profile or get_profile(config.profile, block_size=config.block_size)
        self.requests = list(requests)
        self.max_model_len = config.max_model_len or self.profile.max_model_len
        assembly.check_requests(config, self.profile, self.requests, self.max_model_len)
        self.engine_config = assembly.engine_config(config, self.profile, self.max_model_len)
        self.loop = EventLoop()
        self.host = (
            SharedHost(self.loop, config.host_cores, config.host_background_jobs)
            if config.host_cores is not None
            else None
        )
        self._num_streams = 0  # keys of token-streaming jobs on the shared host
        # The global scheduler's policies, the live ones, by the names the config gives.
        (
            self.dispatch_policy,
            self.migration_policy,
            self.selection_policy,
            self.scaling_policy,
        ) = assembly.scheduler_policies(config, self.profile, self.engine_config)
        self.migrations = MigrationManager(
            self.loop,
            assembly.migration_cost(config, self.profile),
            on_commit=self._on_commit,
            on_change=self._kick,
        )
        self.groups = self._make_groups()
        self.ledger = RequestLedger(self.requests)
        self.instances: dict[str, SimInstance] = {}  # alive: starting, ready or draining
        self.removed: list[SimInstance] = []
        self.num_pending = 0  # instances starting up
        self.parked: list[SimRequest | RequestState] = []  # nowhere to dispatch them yet
        self._next_instance = 0
        self._timeline: list[tuple[float, int]] = []
        self._prompts: dict[int, list[int]] = {}

    def _make_groups(self) -> GroupManager | None:
        """The KunServe group loop (None for the KV-centric policies)."""
        config, profile = self.config, self.profile
        if config.group == "none":
            return None
        self.group_config = assembly.group_config(config, profile, self.engine_config)
        return GroupManager(
            self.loop,
            make_group_policy(config.group, config=self.group_config),
            assembly.group_cost(config, profile),
            formation=assembly.group_formation(config, profile),
            micro_batches=config.micro_batches,
            on_outputs=self._record_outputs,
            on_preempted=self._note_preempted,
            dispatch=self._dispatch,
            kick=self._kick,
            host=self.host,
            stage_overhead_s=config.step_overhead_s,
        )

    # ---- running ------------------------------------------------------------------

    def run(self) -> SimResult:
        start, start_cpu = time.perf_counter(), time.process_time()
        for _ in range(self.config.num_instances):
            self._add_instance(ready_at=0.0)
        self._timeline.append((0.0, len(self.instances)))
        if self.requests:
            self.loop.at(self.requests[0].arrival_s, self._on_arrival, 0)
        if self.config.migration != "none":
            self.loop.at(self.config.migration_config.interval_s, self._on_migration_tick)
        if self.config.scaling is not None:
            self.loop.at(self.config.scaling.interval_s, self._on_scaling_tick)
        if self.groups is not None:
            self.loop.at(self.group_config.interval_s, self._on_group_tick)
        # Ticks stop once every request finished; the rest drains (e.g. a migration
        # whose request finished first aborts at its stage end and frees its reservation).
        self.loop.run(lambda: False)
        if not self._is_done():
            raise SimulationError(
                f"stalled at t={self.loop.now:.3f}: "
                f"{self.ledger.num_finished}/{len(self.requests)} requests finished"
            )
        return self._result(time.perf_counter() - start, time.process_time() - start_cpu)

    def _is_done(self) -> bool:
        return self.ledger.num_finished == len(self.requests)

    def _result(self, wall_s: float, cpu_s: float) -> SimResult:
        records = self.ledger.conserved()
        makespan = max((r.finish_s for r in records), default=0.0)
        if self.groups is not None:
            self.groups.finish()
            if self.groups.num_returning:
                raise SimulationError(f"{self.groups.num_returning} requests never went home")
        everyone = [*self.instances.values(), *self.removed]
        if self.config.check_integrity:
            for instance in everyone:
                instance.engine.check_integrity()
                if not instance.is_empty:
                    raise SimulationError(
                        f"instance {instance.instance_id} is not empty at the end"
                    )
        instance_seconds = sum(
            max(0.0, min(makespan, inst.removed_s if inst.removed_s is not None else makespan))
            - min(inst.created_s, makespan)
            for inst in everyone
        )
        return SimResult(
            records=records,
            summary=summarize(records, self.migrations.stats.num_committed),
            migration=self.migrations.stats,
            makespan_s=makespan,
            instance_seconds=instance_seconds,
            num_events=self.loop.num_events,
            num_steps=sum(inst.num_steps for inst in everyone),
            wall_s=wall_s,
            cpu_s=cpu_s,
            instance_timeline=self._timeline,
            groups=self.groups.stats if self.groups is not None else GroupStats(),
        )

    # ---- instances ----------------------------------------------------------------

    def _add_instance(self, ready_at: float) -> SimInstance:
        instance_id = f"i{self._next_instance:02d}"
        self._next_instance += 1
        instance = SimInstance(
            instance_id,
            self.engine_config,
            self.profile.cost_profile,
            self.config.load_model,
            created_s=self.loop.now,
            step_overhead_s=self.config.step_overhead_s,
            clock=self._now,
            live_admission=self.config.live_admission,
            load_at_step_end=self.config.load_at_step_end,
        )
        self.instances[instance_id] = instance
        if ready_at <= self.loop.now:
            instance.ready_s = self.loop.now
        else:
            self.num_pending += 1
            self.loop.at(ready_at, self._on_ready, instance)
        return instance

    def _now(self) -> float:
        return self.loop.now

    def _on_ready(self, instance: SimInstance) -> None:
        instance.ready_s = self.loop.now
        self.num_pending -= 1
        parked, self.parked = self.parked, []
        for item in parked:
            self._dispatch(item)

    def _ready(self) -> list[SimInstance]:
        return [inst for inst in self.instances.values() if inst.ready_s is not None]

    def _kick(self, instance: SimInstance) -> None:
        """Starts the instance's next step if it is idle and has work."""
        if instance.group_id and self.groups is not None and not self.groups.steps_alone(instance):
            self.groups.kick(instance)  # forming, or a pipeline stage
            return
        if instance.is_busy or instance.ready_s is None or instance.removed_s is not None:
            return
        started = instance.start_step()
        if started is None:
            self._maybe_remove(instance)
            return
        duration_s, preempted = started
        self._note_preempted(preempted)
        if self.host is None:
            self.loop.at(self.loop.now + duration_s, self._on_step_end, instance)
        else:
            self.host.run(instance.instance_id, duration_s, self._on_step_end, instance)

    def _note_preempted(self, request_ids: Sequence[str]) -> None:
        self.ledger.note_preempted(request_ids, self.loop.now)

    def _on_step_end(self, instance: SimInstance) -> None:
        outputs = instance.finish_step()
        self._record_outputs(instance, outputs)
        self.migrations.on_step_end(instance)
        self._kick(instance)

    def _record_outputs(self, instance: SimInstance, outputs: Sequence[RequestOutput]) -> None:
        """A step's (or a group's micro-batch's) tokens reach the requests' records."""
        if self.host is not None and self.config.stream_cpu_per_token_s > 0 and outputs:
            # The tokens go out through worker, gateway and client while the next step runs.
            num_tokens = sum(len(out.new_token_ids) for out in outputs)
            self._num_streams += 1
            self.host.run(
                ("stream", self._num_streams),
                num_tokens * self.config.stream_cpu_per_token_s,
                _ignore,
            )
        self.ledger.note_outputs(instance.instance_id, outputs, self.loop.now)

    def _maybe_remove(self, instance: SimInstance) -> None:
        if instance.is_terminating and instance.is_empty and instance.num_migrating == 0:
            instance.removed_s = self.loop.now
            del self.instances[instance.instance_id]
            self.removed.append(instance)
            self._timeline.append((self.loop.now, len(self.instances)))

    # ---- dispatch -----------------------------------------------------------------

    def _on_arrival(self, index: int) -> None:
        request = self.requests[index]
        if index + 1 < len(self.requests):
            self.loop.at(self.requests[index + 1].arrival_s, self._on_arrival, index + 1)
        latency_s = self.config.dispatch_latency_s
        if latency_s > 0 and self.host is not None:
            # On a shared host the request's way to its instance is work on its cores.
            self.host.run(("dispatch", request.request_id), latency_s, self._dispatch, request)
        elif latency_s > 0:
            self.loop.at(self.loop.now + latency_s, self._dispatch, request)
        else:
            self._dispatch(request)

    def _dispatch(self, item: SimRequest | RequestState) -> None:
        """Sends a new request (SimRequest) or a re-dispatched queued one (RequestState)."""
        if isinstance(item, SimRequest):
            num_prompt = item.num_prompt_tokens
            priority = item.priority if self.config.use_priorities else 0
        else:
            num_prompt, priority = len(item.prompt_token_ids), item.priority
        ready = [inst for inst in self._ready() if not inst.is_terminating]
        instance_id = self.dispatch_policy.choose(
            [inst.load() for inst in ready], DispatchInfo(item.request_id, num_prompt, priority)
        )
        if instance_id is None:
            self.parked.append(item)
            return
        instance = self.instances[instance_id]
        if isinstance(item, SimRequest):
            instance.add_request(
                item.request_id,
                self._prompt(num_prompt),
                item.num_output_tokens,
                priority,
                item.arrival_s,
            )
        else:
            instance.import_request(item, [])
        self._kick(instance)

    def _prompt(self, num_tokens: int) -> list[int]:
        # Token values do not matter to the cost model; share one list per length.
        prompt = self._prompts.get(num_tokens)
        if prompt is None:
            prompt = self._prompts[num_tokens] = [TOKEN_ID] * num_tokens
        return prompt

    # ---- migration ----------------------------------------------------------------

    def _on_migration_tick(self, _arg: object = None) -> None:
        if self._is_done():
            return
        ready = self._ready()
        for instance in ready:
            if instance.is_terminating:
                self._hand_back_queued(instance)
        for pair in self.migration_policy.pair([inst.load() for inst in ready]):
            src, dst = self.instances[pair.src_instance_id], self.instances[pair.dst_instance_id]
            bm = src.block_manager
            candidates = [
                (r.request_id, r.num_tokens, len(bm.block_ids(r.request_id)), r.priority)
                for r in src.scheduler.running
                if src.can_migrate(r.request_id)
            ]
            chosen = self.selection_policy.select(
                candidates, pair.num_requests, max_blocks=dst.block_manager.num_free_blocks
            )
            for request_id in chosen:
                if not self.migrations.start(src, dst, request_id):
                    break
        self.loop.at(
            self.loop.now + self.config.migration_config.interval_s, self._on_migration_tick
        )

    def _hand_back_queued(self, instance: SimInstance) -> None:
        """A draining instance's queued requests hold no KV: dispatch them again."""
        for request in list(instance.scheduler.waiting):
            self._dispatch(instance.remove(request.request_id))
        self._maybe_remove(instance)

    def _on_commit(self, migration: SimMigration) -> None:
        self.ledger.note_migrated(migration.request.request_id)

    # ---- KunServe groups -----------------------------------------------------------

    def _on_group_tick(self, _arg: object = None) -> None:
        if self._is_done():
            return
        assert self.groups is not None
        self.groups.tick(self._ready())
        self.loop.at(self.loop.now + self.group_config.interval_s, self._on_group_tick)

    # ---- scaling ------------------------------------------------------------------

    def _on_scaling_tick(self, _arg: object = None) -> None:
        if self._is_done():
            return
        assert self.scaling_policy is not None and self.config.scaling is not None
        ready = self._ready()
        decision = self.scaling_policy.decide(
            [inst.load() for inst in ready], self.loop.now, self.num_pending
        )
        if decision.action is ScaleAction.UP:
            for _ in range(decision.num_instances):
                self._add_instance(ready_at=self.loop.now + self.config.instance_startup_s)
            self._timeline.append((self.loop.now, len(self.instances)))
        elif decision.action is ScaleAction.DOWN:
            instance = self.instances[decision.instance_id]
            instance.is_terminating = True
            instance.touch()
            self._hand_back_queued(instance)
        self.loop.at(self.loop.now + self.config.scaling.interval_s, self._on_scaling_tick)


def _ignore(_arg: object) -> None:
    pass
