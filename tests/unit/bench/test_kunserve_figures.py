"""The arithmetic and the JSON of `llmesh bench kunserve_mechanism` (no processes)."""

from __future__ import annotations

import pytest

from bench._kunserve_figures import (
    Capacity,
    group_figures,
    median_gap_ms,
    percentile,
    stall_ms,
    summarize,
    target_ratio,
)


def test_target_ratio_is_the_issues_formula():
    assert round(target_ratio(2, 0.55), 4) == 1.6111
    assert round(target_ratio(4, 0.55), 4) == 1.9167
    assert target_ratio(2, 0.0) == 1.0  # no weights: nothing to free
    assert target_ratio(1, 0.55) == 1.0  # a group of one frees nothing
    with pytest.raises(ValueError, match="weight_share"):
        target_ratio(2, 1.0)
    with pytest.raises(ValueError, match="num_stages"):
        target_ratio(0, 0.5)


def test_capacity_in_tokens_and_within_five_percent_of_the_formula():
    capacity = Capacity(num_stages=2, block_size=16, num_blocks_before=318, num_group_blocks=514)
    assert (capacity.tokens_before, capacity.tokens_after) == (5088, 8224)
    assert capacity.is_within(0.55)  # 1.6164 vs 1.6111
    short = Capacity(num_stages=2, block_size=16, num_blocks_before=318, num_group_blocks=480)
    assert not short.is_within(0.55)  # 1.5094: 6.3% short
    assert short.is_within(0.55, tolerance=0.07)


def test_percentile_median_gap_and_stall():
    assert percentile([5.0, 1.0, 3.0, 2.0, 4.0], 50) == 3.0
    assert percentile([5.0, 1.0, 3.0, 2.0, 4.0], 99) == 5.0
    assert percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        percentile([], 50)
    times = [0.0, 0.010, 0.020, 0.100, 0.110, 0.125]
    assert median_gap_ms(times, num_last=2) == pytest.approx(12.5)
    assert stall_ms(times, since=0.05) == pytest.approx(80.0)  # 0.020 -> 0.100
    assert stall_ms(times, since=1.0) == 0.0


def _round(drop, restore, step, unpipelined, pipelined, exact=True) -> dict:
    return {
        "drop_ms": drop,
        "restore_ms": restore,
        "decode_step_ms": step,
        "unpipelined_tokens_per_s": unpipelined,
        "pipelined_tokens_per_s": pipelined,
        "tokens_identical": exact,
    }


def test_group_figures_take_medians_and_the_median_of_each_rounds_ratio():
    figures = group_figures(
        [
            _round(100, 200, 10, 400, 300),
            _round(120, 260, 12, 500, 500),
            _round(90, 220, 11, 600, 480),
        ]
    )
    assert figures == {
        "drop_ms": 100,
        "restore_ms": 220,
        "decode_step_ms": 11,
        "unpipelined_tokens_per_s": 500,
        "pipelined_tokens_per_s": 480,
        "pipeline_vs_unpipelined": 0.8,
        "pipeline_vs_unpipelined_samples": [0.75, 1.0, 0.8],
        "drop_ms_samples": [100, 120, 90],
        "restore_ms_samples": [200, 260, 220],
        "tokens_identical": True,
    }
    assert not group_figures([_round(1, 1, 1, 1, 1), _round(1, 1, 1, 1, 1, exact=False)])[
        "tokens_identical"
    ]


def test_summarize_holds_the_issues_keys_keyed_by_g():
    capacities = {
        2: Capacity(2, 16, 318, 514),
        4: Capacity(4, 16, 636, 1221),
    }
    groups = {
        2: group_figures([_round(100.0, 200.0, 10.0, 400.0, 300.0)]),
        4: group_figures([_round(300.0, 600.0, 20.0, 500.0, 500.0)]),
    }
    activation = {"p99_idle_ms": 1.0, "p99_exchange_ms": 3.5, "exchange_gbps": 2.25}
    summary = summarize(0.55, capacities, groups, activation, {"note": "x"})
    assert {k: summary[k] for k in list(summary)[:11]} == {
        "weight_share": 0.55,
        "capacity_tokens_before": {"2": 5088, "4": 10176},
        "capacity_tokens_after": {"2": 8224, "4": 19536},
        "capacity_ratio": {"2": 1.6164, "4": 1.9198},
        "capacity_target_ratio": {"2": 1.6111, "4": 1.9167},
        "capacity_within_5pct": {"2": True, "4": True},
        "drop_ms": {"2": 100.0, "4": 300.0},
        "restore_ms": {"2": 200.0, "4": 600.0},
        "decode_step_ms": {"2": 10.0, "4": 20.0},
        "pipeline_vs_unpipelined": {"2": 0.75, "4": 1.0},
        "unpipelined_tokens_per_s": {"2": 400.0, "4": 500.0},
    }
    assert summary["activation_p99_idle_ms"] == 1.0
    assert summary["activation_p99_exchange_ms"] == 3.5
    assert summary["activation_exchange_over_idle"] == 3.5
    assert summary["activation_within_3x"] is False
    assert summary["exchange_gbps"] == 2.25
    assert summary["note"] == "x"
