"""The burst comparison's report (services/simulator/burst.py)."""

import json

import pytest

from services.common.config import ConfigError
from services.simulator.burst import BurstConfig, burst_tables, run_burst, targets

ROW_KEYS = {
    "intensity",
    "policy",
    "p50_ttft_s",
    "p99_ttft_s",
    "p99_tpot_s",
    "p99_e2e_s",
    "preemptions",
    "drops",
    "migrations",
    "bubble_fraction",
}


def test_burst_report_has_the_issues_keys():
    cfg = BurstConfig(
        num_instances=2, num_requests=40, base_rate=4.0, intensities=(2.0, 3.0), workers=1
    )
    report = json.loads(json.dumps(run_burst(cfg)))
    assert [(r["intensity"], r["policy"]) for r in report["burst"]] == [
        (k, p) for k in (2.0, 3.0) for p in ("recompute", "llumnix", "kunserve", "llmesh")
    ]
    for r in report["burst"]:
        assert set(r) >= ROW_KEYS
    assert set(report["lookahead"]) >= {"simple_bubble_fraction", "lookahead_bubble_fraction"}
    assert "swap" in report["notes"][0]
    assert "x3" in burst_tables(report)


def test_burst_workload_has_bursts_of_the_given_intensity():
    cfg = BurstConfig(base_rate=10.0, burst_s=5.0, period_s=20.0)
    assert cfg.workload(4.0).rate_schedule == ((15.0, 10.0), (5.0, 40.0))


def test_targets_compare_p99_ttft():
    rows = [
        {"intensity": k, "policy": p, "p99_ttft_s": v}
        for k, vals in ((2.0, (1.0, 0.9, 0.8, 0.7)), (4.0, (50.0, 40.0, 3.0, 3.0)))
        for p, v in zip(("recompute", "llumnix", "kunserve", "llmesh"), vals, strict=True)
    ]
    assert targets(rows) == {
        "kunserve_vs_best_kv_centric_at_heaviest": 13.33,
        "kunserve_10x": True,
        "llmesh_at_least_as_good_everywhere": True,
        "llmesh_strictly_better_somewhere": True,
    }


def test_burst_config_rejects_unknown_presets():
    with pytest.raises(ConfigError, match="presets"):
        BurstConfig(policies=("swap",))


def test_the_group_presets_also_run_with_the_other_formation_at_the_heaviest_burst():
    cfg = BurstConfig(
        num_instances=2,
        num_requests=40,
        base_rate=4.0,
        intensities=(2.0, 3.0),
        policies=("llumnix", "kunserve"),
        workers=1,
    )
    report = run_burst(cfg)
    assert [(r["intensity"], r["policy"], r["micro_batching"]) for r in report["burst"]] == [
        (k, p, "lookahead") for k in (2.0, 3.0) for p in ("llumnix", "kunserve")
    ]
    assert [(r["intensity"], r["policy"], r["micro_batching"]) for r in report["formations"]] == [
        (3.0, "kunserve", "simple")
    ]
    assert report["lookahead"]["intensities"] == [3.0]
    assert "kunserve (simple)" in burst_tables(report)
