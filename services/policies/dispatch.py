"""Dispatch policies: choose the instance for a new request.

Registered names:
    freest        Llumnix: highest freeness once the instance's queue and the new
                  request are admitted, over physical demand (high-priority headroom
                  works through migration, not here); a KunServe group counts at its
                  members' own capacity (its freed memory is for its overload). The
                  default.
    round_robin   baseline: instances in id order, one after another.
    load_balance  baseline (INFaaS++-like): lowest physical demand ratio
                  (used blocks + blocks all queued requests need) / total blocks; no
                  virtual usage, so no de-fragmentation, headroom or drain signal.

Every policy skips terminating instances, KunServe pipeline stages other than 0 (a
group takes its requests through stage 0, whose load is the group's) and
`DispatchInfo.exclude_instance_ids`, and returns None when nothing is left. Ties go to
the lowest instance id.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from services.common.config import require
from services.policies.groups import capacity_gain
from services.policies.load import InstanceLoad, freeness
from services.policies.registry import register_dispatch


@dataclass(frozen=True)
class DispatchInfo:
    """What a dispatch policy knows about the new request."""

    request_id: str
    num_prompt_tokens: int
    priority: int = 0
    # Instances to avoid (e.g. one that just failed for this request).
    exclude_instance_ids: tuple[str, ...] = ()


class DispatchPolicy:
    """Base class: `choose` returns an instance id from loads, or None if none fits."""

    name = "base"

    def choose(self, loads: Sequence[InstanceLoad], request: DispatchInfo) -> str | None:
        raise NotImplementedError


def _candidates(loads: Sequence[InstanceLoad], request: DispatchInfo) -> list[InstanceLoad]:
    excluded = set(request.exclude_instance_ids)
    return [
        ld
        for ld in loads
        if not ld.is_terminating and not ld.is_group_follower and ld.instance_id not in excluded
    ]


@register_dispatch("freest")
class FreestDispatch(DispatchPolicy):
    """Llumnix: the instance that will be freest with the request; ties to the lowest id.

    Each instance is ranked by its freeness once its queue and the new request are
    admitted: (total - used - all queued demand - the request's prompt blocks) /
    (running + waiting + 1). Counting the whole queue, not just the head of
    line, spreads a burst that arrives within one engine step instead of stacking it
    on one instance (the live Llumnix scheduler gets the same effect by counting the
    requests it dispatched since an instance's last load report).

    High-priority headroom is not counted, for any request: it is virtual usage that
    makes migration move normal requests off an instance serving high-priority ones
    when another instance has room (free for them: live migration), while turning a
    normal request away from physically free memory here would leave that memory idle
    when the whole cluster is loaded, the one time priorities matter. On the simulator
    (docs/simulator.md, "Priorities per seed") counting it here cost normal requests
    more P99 TTFT on three of four workload seeds and bought high-priority ones nothing
    measurable.

    A KunServe group (stage 0's load is the group's) counts at its members' own
    capacity, `num_total_blocks / capacity_gain(g, group_weight_share)` with g the
    members in `loads` (stage 0 and its followers), not at its pool: the memory the
    drop freed is for the overload that formed the group, and a group has g members'
    compute for gain(g) x g members' memory. Ranked by its pool, freeness equalisation
    filled it gain(g) times as deep per unit of compute as an instance alone (slower
    prompts and tokens there) and kept its usage level with the cluster's, so it only
    restored when the whole cluster emptied (docs/simulator.md, "Burst results"). A
    group whose followers `loads` lacks counts at its pool.
    """

    name = "freest"

    def __init__(self, group_weight_share: float = 0.55) -> None:
        require(
            0 <= group_weight_share < 1,
            f"group_weight_share={group_weight_share} must be in [0, 1)",
        )
        self.group_weight_share = group_weight_share

    def choose(self, loads, request):
        candidates = _candidates(loads, request)
        if not candidates:
            return None
        sizes = group_sizes(loads)
        best = min(
            candidates,
            key=lambda ld: (
                -self.freeness_with(ld, request, self.own_blocks(ld, sizes)),
                ld.instance_id,
            ),
        )
        return best.instance_id

    def own_blocks(self, load: InstanceLoad, sizes: dict[str, int]) -> int:
        """The blocks dispatch counts for `load`: a group's members' own, else its total."""
        num_stages = sizes.get(load.group_id, 1) if load.is_in_group else 1
        if num_stages < 2:
            return load.num_total_blocks
        return int(load.num_total_blocks / capacity_gain(num_stages, self.group_weight_share))

    @staticmethod
    def freeness_with(
        load: InstanceLoad, request: DispatchInfo, num_total_blocks: int | None = None
    ) -> float:
        """The instance's freeness once its queue and `request` are admitted (over
        `num_total_blocks` when given, else its own total)."""
        total = load.num_total_blocks if num_total_blocks is None else num_total_blocks
        demand = -(-request.num_prompt_tokens // load.block_size)
        usage = load.num_used_blocks + load.num_waiting_blocks + demand
        return freeness(total, usage, load.num_running + load.num_waiting + 1)


def group_sizes(loads: Sequence[InstanceLoad]) -> dict[str, int]:
    """Members of each KunServe group among `loads` (stage 0 and its followers)."""
    sizes: dict[str, int] = {}
    for ld in loads:
        if ld.is_in_group:
            sizes[ld.group_id] = sizes.get(ld.group_id, 0) + 1
    return sizes


@register_dispatch("round_robin")
class RoundRobinDispatch(DispatchPolicy):
    """Baseline: instances in id order, one after another."""

    name = "round_robin"

    def __init__(self) -> None:
        self._counter = itertools.count()

    def choose(self, loads, request):
        candidates = sorted(ld.instance_id for ld in _candidates(loads, request))
        if not candidates:
            return None
        return candidates[next(self._counter) % len(candidates)]


@register_dispatch("load_balance")
class LoadBalanceDispatch(DispatchPolicy):
    """Baseline (INFaaS++-like): least physical demand; ties to fewer requests, then id.

    demand = (used blocks + blocks every queued request needs) / total blocks. It sees
    memory, not virtual usage: no head-of-line weighting, no priority headroom.
    """

    name = "load_balance"

    def choose(self, loads, request):
        candidates = _candidates(loads, request)
        if not candidates:
            return None
        best = min(
            candidates,
            key=lambda ld: (
                _demand_ratio(ld),
                ld.num_running + ld.num_waiting,
                ld.instance_id,
            ),
        )
        return best.instance_id


def _demand_ratio(load: InstanceLoad) -> float:
    if load.num_total_blocks <= 0:
        return float("inf")
    return (load.num_used_blocks + load.num_waiting_blocks) / load.num_total_blocks
