"""What a simulated KunServe group is: its phase, its costs, its stages, its counters.

Plain state, kept apart from the code that moves it (groups.py forms and restores
groups, group_pipeline.py steps their micro-batches) so that both can name the same
types without importing each other, and a reader finds the state machine in one place.

    GroupPhase:  FORMING -> SERVING -> RELOADING -> DRAINING -> DISSOLVED
"""

from __future__ import annotations

import enum
import math
from collections import deque
from dataclasses import dataclass, field

from services.policies.microbatch import PipelineClock
from services.simulator.instance import SimInstance
from services.simulator.link import Link
from services.worker.engine.micro_batching import MicroBatchFormation
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
    join_s: float = 0.0  # each member's join, from its step boundary (SimConfig.group_join_s)
    two_phase_join: bool = False  # SimConfig.group_two_phase_join


@dataclass
class GroupStats:
    num_drops: int = 0  # groups formed
    drop_times_s: list[float] = field(default_factory=list)  # when each began serving
    decided_times_s: list[float] = field(default_factory=list)  # when the policy chose each
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
class MicroBatchInFlight:
    """A micro-batch the leader formed, on its way through the stages."""

    batch: SchedulerOutput
    sampled_token_ids: list[int]
    stage_s: list[float]  # each stage's compute time
    num_tokens: int


@dataclass
class PipelineStage:
    """One member's place in the pipeline: the micro-batches waiting for it, the one
    it runs, and its busy time (for the bubble fraction)."""

    queue: deque[MicroBatchInFlight] = field(default_factory=deque)
    running: MicroBatchInFlight | None = None
    busy_s: float = 0.0


@dataclass
class SimGroup:
    group_id: str
    members: list[SimInstance]  # stage order
    layer_ranges: list[tuple[int, int]]
    phase: GroupPhase = GroupPhase.FORMING
    formed_s: float = math.nan
    num_group_blocks: int = 0
    stages: list[PipelineStage] = field(default_factory=list)
    links: list[Link] = field(default_factory=list)
    exchanging: dict[str, float] = field(default_factory=dict)  # request id -> since
    joining: set[str] = field(default_factory=set)  # members whose join has started
    prepared: set[str] = field(default_factory=set)  # two-phase: PrepareJoin done
    all_prepared: bool = False  # two-phase: JoinGroup sent to every member
    num_joined: int = 0  # members whose join is done (GroupCost.join_s)
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
