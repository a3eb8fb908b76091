"""The timing of micro-batches through a g-stage pipeline, and its bubble fraction.

Pure arithmetic, shared by the worker (a KunServe group's stage 0 counts a modelled
bubble fraction live) and the simulator (it times a group's micro-batches with it).

Micro-batch k takes cost[k][s] seconds on stage s. Stage s starts k when it has
finished k-1 and stage s-1 has finished k (plus `transfer_s` for the activation hop);
stage 0 also waits until micro-batch k - max_in_flight has come back from the last
stage (plus `transfer_s` for the return), since at most max_in_flight are out:

    stage 0   [k-1][ k ]                [k+M ...        (k+M waits for k's return)
    stage 1        ....[ k ]
    stage g-1               ...[ k ]--return-->

    bubble fraction = idle stage time / total stage time
                    = 1 - sum of every cost / (g * makespan),
    makespan = from the first start to the last finish on the last stage.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class PipelineClock:
    """Times micro-batches one at a time as they are formed (the simulator adds each
    when its stage 0 can start it: `not_before`)."""

    num_stages: int
    max_in_flight: int = 0  # 0 = one per stage
    transfer_s: float = 0.0  # one activation hop (stage to stage, and the return)
    is_recording: bool = True  # keep every start and finish (off: O(g) memory, live use)
    starts: list[list[float]] = field(default_factory=list)  # [k][s]
    finishes: list[list[float]] = field(default_factory=list)  # [k][s]
    busy_s: float = 0.0  # sum of every stage's costs
    num_micro_batches: int = 0
    _first_start: float = 0.0
    _last_finish: float = 0.0
    _stage_free: list[float] = field(default_factory=list)
    _returns: collections.deque = field(default_factory=collections.deque)

    def __post_init__(self) -> None:
        if self.num_stages < 1:
            raise ValueError(f"num_stages={self.num_stages} must be >= 1")
        if self.max_in_flight < 0:
            raise ValueError(f"max_in_flight={self.max_in_flight} must be >= 0")
        if self.transfer_s < 0:
            raise ValueError(f"transfer_s={self.transfer_s} must be >= 0")
        if self.max_in_flight == 0:
            self.max_in_flight = self.num_stages
        self._stage_free = [0.0] * self.num_stages

    def next_start(self, not_before: float = 0.0) -> float:
        """When stage 0 can start the next micro-batch."""
        start = max(self._stage_free[0], not_before)
        if len(self._returns) == self.max_in_flight:
            start = max(start, self._returns[0])
        return start

    def add(self, costs: float | Sequence[float], not_before: float = 0.0) -> float:
        """Times the next micro-batch (costs: per stage, or one figure for every stage);
        returns when its result is back at stage 0."""
        per_stage = _per_stage(costs, self.num_stages)
        starts, finishes = [], []
        ready = self.next_start(not_before)
        for s, cost in enumerate(per_stage):
            start = max(self._stage_free[s], ready)
            finish = start + cost
            self._stage_free[s] = finish
            starts.append(start)
            finishes.append(finish)
            ready = finish + self.transfer_s
        if len(self._returns) == self.max_in_flight:
            self._returns.popleft()
        self._returns.append(ready)
        if self.is_recording:
            self.starts.append(starts)
            self.finishes.append(finishes)
        if self.num_micro_batches == 0:
            self._first_start = starts[0]
        self._last_finish = finishes[-1]
        self.num_micro_batches += 1
        self.busy_s += sum(per_stage)
        return ready

    @property
    def makespan_s(self) -> float:
        """From the first start to the last finish on the last stage."""
        return self._last_finish - self._first_start

    @property
    def bubble_fraction(self) -> float:
        """Idle stage time / total stage time (0 before any micro-batch)."""
        total = self.num_stages * self.makespan_s
        if total <= 0:
            return 0.0
        return 1.0 - self.busy_s / total


def _per_stage(costs: float | Sequence[float], num_stages: int) -> list[float]:
    if isinstance(costs, int | float):
        per_stage = [float(costs)] * num_stages
    else:
        per_stage = [float(c) for c in costs]
        if len(per_stage) != num_stages:
            raise ValueError(f"{len(per_stage)} stage costs for {num_stages} stages")
    if any(c < 0 for c in per_stage):
        raise ValueError(f"stage costs must be >= 0, got {per_stage}")
    return per_stage


def simulate_pipeline(
    stage_costs: Sequence[float | Sequence[float]],
    num_stages: int,
    max_in_flight: int = 0,
    transfer_s: float = 0.0,
) -> PipelineClock:
    """Times a run of micro-batches (each: its cost on every stage, or one figure for
    all of them), formed back to back; `.starts`, `.finishes`, `.bubble_fraction`."""
    clock = PipelineClock(num_stages, max_in_flight, transfer_s)
    for costs in stage_costs:
        clock.add(costs)
    return clock


def bubble_fraction(
    stage_costs: Sequence[float | Sequence[float]],
    num_stages: int,
    max_in_flight: int = 0,
    transfer_s: float = 0.0,
) -> float:
    """Idle stage time / total stage time of a run of micro-batches (simulate_pipeline)."""
    return simulate_pipeline(stage_costs, num_stages, max_in_flight, transfer_s).bubble_fraction
