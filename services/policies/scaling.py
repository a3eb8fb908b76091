"""Auto-scaling policies: keep the cluster's average freeness inside a band.

The scheduler (or the simulator) calls `decide(loads, now, num_pending)` every
`ScalingConfig.interval_s`. Scale-up asks the provisioner for one more instance; load
flows to it through dispatch and migration. Scale-down marks one instance
terminating: its virtual usage becomes infinite, so dispatch avoids it and migration
drains it; the caller removes it once it is empty.

"Average freeness" is the freeness of the cluster taken as one instance
(sum of free virtual blocks / sum of batch sizes over non-terminating instances), the
way Llumnix averages load; a plain mean of per-instance freeness would be dominated
by one idle instance (an idle instance's freeness is its whole pool).

Registered names:
    freeness_band   up when average freeness < `scale_up_freeness` (even counting the
                    capacity of instances still starting), by as many instances as
                    bring it back to the middle of the band; down when the average
                    freeness *after removing* the chosen instance would still be
                    > `scale_down_freeness` (so a scale-down never lands below the
                    band's top); `cooldown_s` between actions; one drain at a time;
                    never below `min_instances` or above `max_instances`; never a
                    member of a KunServe group (its requests hold KV on every member).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from services.common.config import require
from services.policies.load import InstanceLoad
from services.policies.registry import register_scaling


class ScaleAction(enum.Enum):
    NONE = "none"
    UP = "up"
    DOWN = "down"


@dataclass(frozen=True)
class ScaleDecision:
    """What to do now: UP adds `num_instances`; DOWN names the instance to mark terminating."""

    action: ScaleAction
    instance_id: str | None = None
    reason: str = ""
    num_instances: int = 1


NO_ACTION = ScaleDecision(ScaleAction.NONE)


@dataclass(frozen=True)
class ScalingConfig:
    """Knobs of the scaling loop and of the `freeness_band` policy."""

    # Seconds between scaling decisions.
    interval_s: float = 1.0
    # Add instances when average freeness drops below this (high: new instances take
    # time to start, so scale before the running ones are full).
    scale_up_freeness: float = 30.0
    # Remove one when average freeness without it would stay above this.
    scale_down_freeness: float = 100.0
    # Seconds after an action before the next one (new instances need time to fill).
    cooldown_s: float = 10.0
    # Never fewer non-terminating instances than this.
    min_instances: int = 1
    # Never more instances (running + starting) than this.
    max_instances: int = 64

    def __post_init__(self) -> None:
        require(self.interval_s > 0, f"interval_s={self.interval_s} must be > 0")
        require(
            self.scale_up_freeness < self.scale_down_freeness,
            f"scale_up_freeness={self.scale_up_freeness} must be < "
            f"scale_down_freeness={self.scale_down_freeness}",
        )
        require(self.cooldown_s >= 0, f"cooldown_s={self.cooldown_s} must be >= 0")
        require(self.min_instances >= 1, f"min_instances={self.min_instances} must be >= 1")
        require(
            self.max_instances >= self.min_instances,
            f"max_instances={self.max_instances} must be >= min_instances={self.min_instances}",
        )


def average_freeness(
    loads: Sequence[InstanceLoad], without: str | None = None, extra_blocks: float = 0.0
) -> float:
    """Freeness of the non-terminating instances taken as one instance.

    `without` drops one instance's capacity (its usage and batch stay: draining moves
    them to the others); `extra_blocks` adds capacity (instances still starting).
    +inf for an empty cluster.
    """
    active = [ld for ld in loads if not ld.is_terminating]
    if not active:
        return math.inf
    num_total = sum(ld.num_total_blocks for ld in active if ld.instance_id != without)
    usage = sum(ld.virtual_usage for ld in active)
    batch = sum(ld.num_running for ld in active)
    return (num_total + extra_blocks - usage) / max(batch, 1)


class ScalingPolicy:
    """Base class: `decide` returns one decision; it remembers its last action's time."""

    name = "base"

    def __init__(self, config: ScalingConfig | None = None) -> None:
        self.config = config or ScalingConfig()
        self._last_action_s = -math.inf

    def decide(
        self,
        loads: Sequence[InstanceLoad],
        now: float,
        num_pending: int = 0,
        removable: Collection[str] | None = None,
    ) -> ScaleDecision:
        """`removable` limits scale-down victims (None = any instance), e.g. to the
        instances the provisioner started and can stop."""
        raise NotImplementedError


@register_scaling("freeness_band")
class FreenessBandScaling(ScalingPolicy):
    name = "freeness_band"

    def decide(self, loads, now, num_pending=0, removable=None):
        cfg = self.config
        active = [ld for ld in loads if not ld.is_terminating]
        num_draining = len(loads) - len(active)
        if len(active) + num_pending < cfg.min_instances:
            return self._act(ScaleDecision(ScaleAction.UP, reason="below min_instances"), now)
        if now - self._last_action_s < cfg.cooldown_s:
            return NO_ACTION
        freeness = average_freeness(loads)
        room = cfg.max_instances - len(loads) - num_pending
        if freeness < cfg.scale_up_freeness and room > 0 and active:
            # Instances still starting will help: count their capacity first.
            pool = sum(ld.num_total_blocks for ld in active) / len(active)
            projected = average_freeness(loads, extra_blocks=num_pending * pool)
            if projected < cfg.scale_up_freeness:
                count = min(room, self._num_to_add(active, pool, num_pending))
                reason = f"average freeness {freeness:.1f}"
                return self._act(ScaleDecision(ScaleAction.UP, None, reason, count), now)
        if num_draining or num_pending or len(active) <= cfg.min_instances:
            return NO_ACTION
        candidates = [
            ld
            for ld in active
            if (removable is None or ld.instance_id in removable) and not ld.is_in_group
        ]
        if not candidates:
            return NO_ACTION
        victim = min(
            candidates,
            key=lambda ld: (ld.num_running + ld.num_waiting, ld.num_used_blocks, _desc(ld)),
        )
        after = average_freeness(loads, without=victim.instance_id)
        if after > cfg.scale_down_freeness:
            return self._act(
                ScaleDecision(
                    ScaleAction.DOWN,
                    victim.instance_id,
                    reason=f"average freeness {freeness:.1f}, {after:.1f} without it",
                ),
                now,
            )
        return NO_ACTION

    def _num_to_add(self, active: Sequence[InstanceLoad], pool: float, num_pending: int) -> int:
        """Instances that bring the average freeness back to the middle of the band."""
        cfg = self.config
        target = (cfg.scale_up_freeness + cfg.scale_down_freeness) / 2
        usage = sum(ld.virtual_usage for ld in active)
        batch = max(sum(ld.num_running for ld in active), 1)
        capacity = sum(ld.num_total_blocks for ld in active) + num_pending * pool
        missing = target * batch + usage - capacity
        return max(1, math.ceil(missing / pool)) if pool > 0 else 1

    def _act(self, decision: ScaleDecision, now: float) -> ScaleDecision:
        self._last_action_s = now
        return decision


def _desc(load: InstanceLoad) -> tuple[int, ...]:
    # Ties go to the highest id: the newest instance when ids are zero-padded.
    return tuple(-ord(c) for c in load.instance_id) + (1,)
