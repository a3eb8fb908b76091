"""One simulated instance: the real engine (accounting only) on a virtual clock.

Each instance is an `LLMEngine.simulated(config, profile)`: the worker's own scheduler,
block manager and cost-model executor, with no tensors. `LLMEngine.step()` is
schedule -> execute -> update in one call; the simulator splits it at the virtual
time boundary so the step's outputs appear when the step ends:

    start_step()      scheduler.schedule(); executor.execute(batch) gives the tokens
                      and the modelled duration d  -> returns d
    finish_step()     scheduler.update_from_output(batch, tokens) when the step ends
                      (now + d, or later on a shared host: services/simulator/host.py)

Migrations and re-dispatch use the engine's own hooks (engine.migration: reserve_blocks,
suspend_request, remove_request, import_request), the ones the live llumlet uses.
"""

from __future__ import annotations

from collections.abc import Callable

from services.policies import (
    InstanceLoad,
    LoadModelConfig,
    add_pending_dispatches,
    make_instance_load,
)
from services.worker.engine.config import EngineConfig
from services.worker.engine.cost_model import CostModelProfile
from services.worker.engine.engine import LLMEngine
from services.worker.engine.executor import ExecutorOutput
from services.worker.engine.outputs import RequestOutput
from services.worker.engine.request import RequestState, RequestStatus
from services.worker.engine.sampling_params import SamplingParams
from services.worker.engine.scheduler import SchedulerOutput

# Prompt tokens are all this id (their values do not matter to the cost model).
TOKEN_ID = 1


class SimInstance:
    def __init__(
        self,
        instance_id: str,
        engine_config: EngineConfig,
        profile: CostModelProfile,
        load_config: LoadModelConfig,
        created_s: float = 0.0,
        step_overhead_s: float = 0.0,
        clock: Callable[[], float] | None = None,
        live_admission: bool = False,
        load_at_step_end: bool = False,
    ) -> None:
        self.instance_id = instance_id
        # Live admission: the worker adds a request to its engine between two steps, so
        # one dispatched mid-step joins when the step ends; until then its report counts
        # it as a waiting request (add_pending_dispatches; the llumlet's Intake).
        self.clock = clock
        self.live_admission = live_admission
        self._deferred: list[tuple] = []  # add_request args, in arrival order
        # Live load reports (load_at_step_end): the worker's engine thread snapshots its
        # load after each step, before it admits what arrived meanwhile and schedules the
        # next one, so the policies see the pool as the last step left it (not the next
        # step's blocks), plus every request that reached the worker since that snapshot
        # (the llumlet's Intake; the registry stops counting a dispatch once the
        # worker's report names it, within a report interval, which this leaves out).
        self.load_at_step_end = load_at_step_end
        self._reported: tuple | None = None  # engine figures of the last snapshot
        self._reported_group = ""  # the group it was in then
        self._unreported: dict[str, int] = {}  # request id -> prompt blocks, since then
        self.engine = LLMEngine.simulated(engine_config, profile)
        self.scheduler = self.engine.scheduler
        self.block_manager = self.engine.block_manager
        self.load_config = load_config
        self.step_overhead_s = step_overhead_s
        self.created_s = created_s
        self.ready_s: float | None = None  # set when it can take requests
        self.removed_s: float | None = None
        self.is_terminating = False
        # KunServe group (groups.py) and pipeline stage; "" while alone.
        self.group_id = ""
        self.group_stage = 0
        self.num_migrating = 0  # migrations in flight, either direction
        self.migrating_out: set[str] = set()  # request ids being copied away
        self._batch: SchedulerOutput | None = None
        self._result: ExecutorOutput | None = None
        self._load: InstanceLoad | None = None
        self.num_steps = 0
        self.busy_s = 0.0
        if load_at_step_end:
            self._reported = self._engine_figures()  # the idle worker's first report

    # ---- state --------------------------------------------------------------------

    @property
    def is_busy(self) -> bool:
        return self._batch is not None

    @property
    def is_empty(self) -> bool:
        return (
            not self.scheduler.requests
            and not self._deferred
            and self.block_manager.num_used_blocks == 0
        )

    def touch(self) -> None:
        """Its load changed: the next `load()` recomputes the snapshot."""
        self._load = None

    def load(self) -> InstanceLoad:
        """The Llumnix load snapshot (cached until `touch`)."""
        if self.load_at_step_end:
            return self._reported_load()
        if self._load is None:
            self._load = self._compute_load()
        if self._deferred:
            return self._with_deferred(self._load)
        return self._load

    def _reported_load(self) -> InstanceLoad:
        """What the live scheduler sees: the last step-end snapshot (a group member's is
        taken every micro-batch: the current state) plus what arrived since."""
        if self.group_id or self._reported is None or self._reported_group != self.group_id:
            self._snapshot()  # joined or left a group: a new pool
        load = self._compute_load(self._reported)
        if not self._unreported:
            return load
        return add_pending_dispatches(load, len(self._unreported), sum(self._unreported.values()))

    def _snapshot(self) -> None:
        """The worker's snapshot, now: it shows every request in the engine (the
        deferred ones stay unreported)."""
        self._reported = self._engine_figures()
        self._reported_group = self.group_id
        deferred = {args[0] for args in self._deferred}
        self._unreported = {i: n for i, n in self._unreported.items() if i in deferred}

    def _with_deferred(self, load: InstanceLoad) -> InstanceLoad:
        """The exact load plus the requests waiting for the step to end (reported)."""
        bm = self.block_manager
        return add_pending_dispatches(
            load,
            len(self._deferred),
            sum(bm.num_blocks_for(len(args[1])) for args in self._deferred),
        )

    def _engine_figures(self) -> tuple[int, ...]:
        # The same inputs the llumlet reports (LLMEngine.stats), without the dataclass.
        scheduler, bm = self.scheduler, self.block_manager
        waiting = scheduler.waiting
        return (
            bm.num_total_blocks,
            bm.num_used_blocks,
            len(scheduler.running),
            len(waiting),
            bm.num_blocks_for(waiting[0].num_tokens) if waiting else 0,
            sum(bm.num_blocks_for(r.num_tokens) for r in waiting),
            sum(1 for r in scheduler.running if r.priority > 0),
        )

    def _compute_load(self, figures: tuple[int, ...] | None = None) -> InstanceLoad:
        total, used, running, waiting, hol, waiting_blocks, high = figures or self._engine_figures()
        scheduler, bm = self.scheduler, self.block_manager
        return make_instance_load(
            self.instance_id,
            num_total_blocks=total,
            num_used_blocks=used,
            num_running=running,
            num_waiting=waiting,
            num_hol_blocks=hol,
            num_waiting_blocks=waiting_blocks,
            num_running_high_priority=high,
            is_terminating=self.is_terminating,
            num_migrating=self.num_migrating,
            num_preemptions=scheduler.num_preemptions,
            block_size=bm.block_size,
            group_id=self.group_id,
            group_stage=self.group_stage,
            config=self.load_config,
        )

    # ---- requests -----------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        num_output_tokens: int,
        priority: int,
        arrival_s: float,
    ) -> None:
        if self.load_at_step_end:
            self._unreported[request_id] = self.block_manager.num_blocks_for(len(prompt_token_ids))
        if self.live_admission and self.is_busy:
            self._deferred.append(
                (request_id, prompt_token_ids, num_output_tokens, priority, arrival_s)
            )
            return
        self._admit(request_id, prompt_token_ids, num_output_tokens, priority, arrival_s)

    def _admit(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        num_output_tokens: int,
        priority: int,
        arrival_s: float,
    ) -> None:
        params = SamplingParams(max_tokens=num_output_tokens, ignore_eos=True, seed=0)
        self.engine.add_request(request_id, prompt_token_ids, params, priority, arrival_s)
        self.touch()

    @property
    def num_deferred(self) -> int:
        """Requests dispatched here mid-step, not yet in the engine."""
        return len(self._deferred)

    def remove(self, request_id: str) -> RequestState:
        """Hands a request over (migration commit, or a queued one re-dispatched)."""
        state = self.engine.migration.remove_request(request_id)
        self._unreported.pop(request_id, None)
        self.touch()
        return state

    def import_request(self, state: RequestState, block_ids: list[int]) -> None:
        """A migrated request (KV in reserved `block_ids`), or a queued one (no blocks)."""
        self.engine.migration.import_request(state, block_ids)
        self.touch()

    def can_migrate(self, request_id: str) -> bool:
        """A decoding request (prefill done) that is not moving already."""
        request = self.scheduler.requests.get(request_id)
        return (
            request is not None
            and request.status is RequestStatus.RUNNING
            and request.num_computed_tokens == request.num_tokens - 1
            and request_id not in self.migrating_out
        )

    # ---- stepping -----------------------------------------------------------------

    def start_step(self) -> tuple[float, list[str]] | None:
        """Schedules one step; returns (duration, preempted request ids), or None if idle."""
        assert self._batch is None
        batch = self.scheduler.schedule()
        if batch.is_empty and not batch.preempted_request_ids:
            return None
        # A step that only preempted (nothing fit) takes no time; the next one retries.
        result = self.engine.executor.execute(batch) if batch.requests else None
        duration = result.elapsed_s + self.step_overhead_s if result is not None else 0.0
        self._batch, self._result = batch, result
        self.num_steps += 1
        self.busy_s += duration
        self.touch()
        return duration, batch.preempted_request_ids

    def finish_step(self) -> list[RequestOutput]:
        batch, result = self._batch, self._result
        assert batch is not None
        self._batch = self._result = None
        self.touch()
        outputs = (
            []
            if result is None
            else self.scheduler.update_from_output(batch, result.sampled_token_ids)
        )
        if self.load_at_step_end:
            self._snapshot()  # before it admits the deferred ones
        deferred, self._deferred = self._deferred, []
        for args in deferred:  # between two steps: the worker admits them now
            self._admit(*args)
        return outputs
