"""What a simulation run returns, and the error it raises when it breaks an invariant.

Apart from cluster.py so that the code reading results (compare.py, burst.py, the
benches) names these types without the simulator's machinery behind them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from services.simulator.group_state import GroupStats
from services.simulator.metrics import LatencySummary, RequestRecord, summarize
from services.simulator.migration import MigrationStats


class SimulationError(RuntimeError):
    """The simulation broke an invariant (conservation, block integrity, deadlock)."""


@dataclass
class SimResult:
    records: list[RequestRecord]
    summary: LatencySummary
    migration: MigrationStats
    makespan_s: float  # last finish time
    instance_seconds: float  # sum of instance lifetimes up to the makespan (startup included)
    num_events: int
    num_steps: int
    wall_s: float
    cpu_s: float  # process CPU time (wall time is noisy on a shared machine)
    # (time, number of instances alive) at every change, for plots.
    instance_timeline: list[tuple[float, int]] = field(default_factory=list)
    # KunServe groups: drops, restores, exchange, bubbles (all zero without groups).
    groups: GroupStats = field(default_factory=GroupStats)

    def summary_for(self, is_high_priority: bool) -> LatencySummary:
        return summarize(r for r in self.records if (r.priority > 0) == is_high_priority)
