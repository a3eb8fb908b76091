"""The figures of `llmesh bench kunserve_mechanism`: pure arithmetic over what the
workers and the data plane reported, and the JSON summary (unit-tested).

Capacity of g members with memory M each, weights W = w * M, KV bytes b per token over
all layers:

    before (each alone)   g * (M - W) / b              tokens
    after  (one group)    (M - W / g) / (b / g)        tokens: each member keeps 1/g of
                        = (g * M - W) / b               the weights and 1/g of each token
    after / before      = (g - w) / (g * (1 - w))      1.61 at g = 2, 1.92 at g = 4 (w = 0.55)
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

CAPACITY_TOLERANCE = 0.05  # the measured ratio may miss the formula's by this much
ACTIVATION_TARGET = 3.0  # activation p99 while KV is exchanged <= this x idle p99


def target_ratio(num_stages: int, weight_share: float) -> float:
    """Tokens a group of num_stages holds over what its members held alone, when
    weights are weight_share of each member's memory: (g - w) / (g (1 - w))."""
    if num_stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {num_stages}")
    if not 0.0 <= weight_share < 1.0:
        raise ValueError(f"weight_share must be in [0, 1), got {weight_share}")
    return (num_stages - weight_share) / (num_stages * (1.0 - weight_share))


@dataclass(frozen=True)
class Capacity:
    """One group's KV capacity, from the workers' reports."""

    num_stages: int
    block_size: int  # tokens per KV block
    num_blocks_before: int  # the members' pools alone, summed (blocks of every layer)
    num_group_blocks: int  # the group's pool (each block: 1/g of the layers on each member)

    @property
    def tokens_before(self) -> int:
        return self.num_blocks_before * self.block_size

    @property
    def tokens_after(self) -> int:
        return self.num_group_blocks * self.block_size

    @property
    def ratio(self) -> float:
        return self.tokens_after / self.tokens_before

    def is_within(self, weight_share: float, tolerance: float = CAPACITY_TOLERANCE) -> bool:
        """Whether the measured ratio is within `tolerance` (relative) of the formula's."""
        return abs(self.ratio / target_ratio(self.num_stages, weight_share) - 1.0) <= tolerance


def percentile(values: list[float], percent: float) -> float:
    """The nearest-rank percentile of values (any order); raises on an empty list."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    index = min(len(ordered) - 1, round(percent / 100 * (len(ordered) - 1)))
    return ordered[index]


def median_gap_ms(times: list[float], num_last: int = 5) -> float:
    """Median interval between the last num_last + 1 arrivals, in ms."""
    tail = times[-(num_last + 1) :]
    if len(tail) < 2:
        raise ValueError("need two arrivals for an interval")
    return statistics.median(b - a for a, b in zip(tail, tail[1:], strict=False)) * 1000


def stall_ms(times: list[float], since: float) -> float:
    """The longest interval between two arrivals that ends after `since`, in ms."""
    gaps = [b - a for a, b in zip(times, times[1:], strict=False) if b > since]
    return max(gaps, default=0.0) * 1000


def tokens_per_s(num_tokens: int, wall_s: float) -> float:
    if wall_s <= 0:
        raise ValueError(f"wall_s must be > 0, got {wall_s}")
    return num_tokens / wall_s


def group_figures(rounds: list[dict]) -> dict:
    """One g's figures over its rounds (each a dict of drop_ms, restore_ms,
    decode_step_ms, unpipelined_tokens_per_s, pipelined_tokens_per_s, tokens_identical):
    medians; the throughput ratio is the median of each round's ratio (its two runs are
    close in time, so other load on the host hits both alike); exact if every round was."""
    if not rounds:
        raise ValueError("no rounds")
    ratios = [r["pipelined_tokens_per_s"] / r["unpipelined_tokens_per_s"] for r in rounds]
    figures = {
        key: statistics.median(r[key] for r in rounds)
        for key in (
            "drop_ms",
            "restore_ms",
            "decode_step_ms",
            "unpipelined_tokens_per_s",
            "pipelined_tokens_per_s",
        )
    }
    return {
        **figures,
        "pipeline_vs_unpipelined": statistics.median(ratios),
        "pipeline_vs_unpipelined_samples": ratios,
        "drop_ms_samples": [r["drop_ms"] for r in rounds],
        "restore_ms_samples": [r["restore_ms"] for r in rounds],
        "tokens_identical": all(r["tokens_identical"] for r in rounds),
    }


def by_stages(values: dict[int, float | int | bool | None], digits: int | None = 3) -> dict:
    """{g: value} with string keys (JSON objects keyed by g), floats rounded."""
    return {
        str(g): round(v, digits) if isinstance(v, float) and digits is not None else v
        for g, v in sorted(values.items())
    }


def summarize(
    weight_share: float,
    capacities: dict[int, Capacity],
    groups: dict[int, dict],
    activation: dict,
    extra: dict | None = None,
) -> dict:
    """The JSON line. groups[g] is group_figures() of g's rounds; activation holds
    p99_idle_ms, p99_exchange_ms, exchange_gbps."""
    stages = sorted(capacities)
    idle, loaded = activation["p99_idle_ms"], activation["p99_exchange_ms"]
    loaded_over_idle = loaded / idle if idle > 0 else None
    summary = {
        "weight_share": round(weight_share, 4),
        "capacity_tokens_before": by_stages({g: capacities[g].tokens_before for g in stages}),
        "capacity_tokens_after": by_stages({g: capacities[g].tokens_after for g in stages}),
        "capacity_ratio": by_stages({g: capacities[g].ratio for g in stages}, 4),
        "capacity_target_ratio": by_stages({g: target_ratio(g, weight_share) for g in stages}, 4),
        "capacity_within_5pct": by_stages(
            {g: capacities[g].is_within(weight_share) for g in stages}
        ),
        "drop_ms": by_stages({g: groups[g]["drop_ms"] for g in stages}),
        "restore_ms": by_stages({g: groups[g]["restore_ms"] for g in stages}),
        "decode_step_ms": by_stages({g: groups[g]["decode_step_ms"] for g in stages}),
        "pipeline_vs_unpipelined": by_stages(
            {g: groups[g]["pipeline_vs_unpipelined"] for g in stages}
        ),
        "unpipelined_tokens_per_s": by_stages(
            {g: groups[g]["unpipelined_tokens_per_s"] for g in stages}, 1
        ),
        "pipelined_tokens_per_s": by_stages(
            {g: groups[g]["pipelined_tokens_per_s"] for g in stages}, 1
        ),
        "tokens_identical": by_stages({g: groups[g]["tokens_identical"] for g in stages}),
        "drop_ms_samples": by_stages({g: _rounded(groups[g]["drop_ms_samples"]) for g in stages}),
        "restore_ms_samples": by_stages(
            {g: _rounded(groups[g]["restore_ms_samples"]) for g in stages}
        ),
        "pipeline_vs_unpipelined_samples": by_stages(
            {g: _rounded(groups[g]["pipeline_vs_unpipelined_samples"]) for g in stages}
        ),
        "activation_p99_idle_ms": round(idle, 3),
        "activation_p99_exchange_ms": round(loaded, 3),
        "activation_exchange_over_idle": (
            None if loaded_over_idle is None else round(loaded_over_idle, 2)
        ),
        "activation_within_3x": loaded_over_idle is not None
        and loaded_over_idle <= ACTIVATION_TARGET,
        "exchange_gbps": round(activation["exchange_gbps"], 3),
    }
    return {**summary, **(extra or {})}


def _rounded(values: list[float], digits: int = 3) -> list[float]:
    return [round(v, digits) for v in values]
