"""The comparison report and the `llmesh simulate` CLI on a tiny, fast configuration."""

import dataclasses
import json
import sys

import pytest

from services.cli.main import main
from services.simulator.compare import (
    POLICY_NAMES,
    CompareConfig,
    fidelity_jobs,
    policy_config,
    pooled_priority,
    priority_jobs,
    run_compare,
    run_job,
    run_jobs,
)
from services.simulator.config import SimConfig
from services.simulator.report import compare_tables

TINY = CompareConfig(
    num_instances=3,
    num_requests=60,
    profile="tiny-cpu",
    rates=(200.0, 800.0, 2000.0),
    priority_rate=None,
    priority_replicas=1,
    prompt="uniform:8:64",
    output="uniform:4:32",
    autoscale_schedule=((0.05, 200.0), (0.05, 2000.0)),
    autoscale_min_instances=1,
    fidelity_requests=30,
    fidelity_rate=200.0,
    workers=1,
)


@pytest.fixture(scope="module")
def report():
    return run_compare(TINY)


def test_report_has_every_key_of_the_contract(report):
    assert list(report)[:6] == [
        "compare",
        "priority",
        "autoscale",
        "fidelity",
        "wall_seconds_16x10k",
        "cpu_seconds_16x10k",
    ]
    assert [(row["rate"], row["policy"]) for row in report["compare"]] == [
        (rate, name) for rate in TINY.rates for name in POLICY_NAMES
    ]
    assert set(report["compare"][0]) == {
        "rate",
        "policy",
        "mean_ttft_s",
        "p99_ttft_s",
        "mean_tpot_s",
        "p99_tpot_s",
        "p99_e2e_s",
        "preemptions",
        "preemption_loss_s",
        "migrations",
    }
    assert {
        "high_p99_ttft_s",
        "high_p99_ttft_no_priority_s",
        "normal_p99_ttft_s",
        "normal_p99_ttft_no_priority_s",
        "high_p99_tpot_s",
        "high_p99_tpot_no_priority_s",
        "max_normal_p99_ttft_cost_pct",
        "replicas",
        "headroom_blocks",
    } <= set(report["priority"])
    assert set(report["priority"]["per_seed"][0]) == {
        "seed",
        *(
            f"{cls}_p99_{metric}{side}_s"
            for cls in ("high", "normal")
            for metric in ("ttft", "tpot")
            for side in ("", "_no_priority")
        ),
        "normal_p99_ttft_cost_pct",
        "high_p99_ttft_speedup",
        "normal_p99_ttft_one_run_spread_pct",
    }
    assert {"instance_seconds", "instance_seconds_fixed", "p99_ttft_s", "p99_ttft_fixed_s"} <= set(
        report["autoscale"]
    )
    assert {"real_mean_ttft_s", "sim_mean_ttft_s", "real_mean_tpot_s", "sim_mean_tpot_s"} <= set(
        report["fidelity"]
    )


def test_report_values(report):
    baselines = [r for r in report["compare"] if r["policy"] in ("round_robin", "load_balance")]
    assert all(r["migrations"] == 0 for r in baselines)
    assert all(r["p99_ttft_s"] >= r["mean_ttft_s"] > 0 for r in report["compare"])
    assert report["fidelity"]["real_mean_ttft_s"] is None
    assert report["fidelity"]["sim_mean_ttft_s"] > 0
    assert report["wall_seconds_16x10k"] > 0
    json.dumps(report)  # plain data all the way down


def test_priority_run_pools_the_requests_of_every_seed(report):
    priority = report["priority"]
    assert priority["seeds"] == [0, 1, 2, 3]
    assert [row["seed"] for row in priority["per_seed"]] == [0, 1, 2, 3]
    # One seed, one replica: the pooled P99s are that seed's own.
    one = dataclasses.replace(TINY, priority_seeds=1, priority_replicas=1, seed=2)
    jobs = priority_jobs(one)
    assert [j.label for j in jobs] == ["priority/with/0/0", "priority/without/0/0"]
    assert jobs[0].workload == jobs[1].workload and jobs[0].workload.seed == 2
    pooled = pooled_priority(one, run_jobs(jobs, workers=1))
    (own,) = pooled["per_seed"]
    assert own["seed"] == 2
    for key in (
        "high_p99_ttft_s",
        "high_p99_ttft_no_priority_s",
        "normal_p99_ttft_s",
        "normal_p99_ttft_no_priority_s",
    ):
        assert pooled[key] == own[key], key
    # Seed 2 is the third seed of the four-seed report.
    assert priority["per_seed"][2] == own


def test_priority_replicas_shift_the_migration_loop_on_both_sides():
    cfg = dataclasses.replace(TINY, priority_seeds=2, priority_replicas=2, seed=7)
    jobs = priority_jobs(cfg)
    assert [j.label for j in jobs] == [
        "priority/with/0/0",
        "priority/without/0/0",
        "priority/with/0/1",
        "priority/without/0/1",
        "priority/with/1/0",
        "priority/without/1/0",
        "priority/with/1/1",
        "priority/without/1/1",
    ]
    assert [j.config.migration_config.interval_s for j in jobs] == [0.05, 0.05, 0.0501, 0.0501] * 2
    assert [j.workload.seed for j in jobs] == [7, 7, 7, 7, 8, 8, 8, 8]
    with_side, without = jobs[0].config, jobs[1].config
    assert (with_side.scheduling_policy, with_side.use_priorities) == ("priority", True)
    assert with_side.load_model.high_priority_headroom_blocks == TINY.high_priority_headroom_blocks
    assert (without.scheduling_policy, without.use_priorities) == ("fcfs", False)
    assert without.load_model.high_priority_headroom_blocks == 0


def _run(normal_ttft: float, high_ttft: float) -> dict:
    """What run_job keeps of one priority run (one request per class)."""
    return {
        "ttfts": {"normal": [normal_ttft], "high": [high_ttft]},
        "tpots": {"normal": [0.05], "high": [0.04]},
        "normal": {"p99_ttft_s": normal_ttft, "p99_tpot_s": 0.05},
        "high": {"p99_ttft_s": high_ttft, "p99_tpot_s": 0.04},
    }


def test_per_seed_cost_is_over_the_mean_of_the_replicas():
    cfg = dataclasses.replace(TINY, priority_seeds=2, priority_replicas=2, seed=5)
    results = {
        # seed 5: normal 11, 13 with (mean 12) vs 10, 10 without: +20%
        "priority/with/0/0": _run(11.0, 1.0),
        "priority/with/0/1": _run(13.0, 1.0),
        "priority/without/0/0": _run(10.0, 4.0),
        "priority/without/0/1": _run(10.0, 6.0),
        # seed 6: 9, 9 vs 8, 12 (mean 10): -10%; one run strays 20% from the mean
        "priority/with/1/0": _run(9.0, 2.0),
        "priority/with/1/1": _run(9.0, 2.0),
        "priority/without/1/0": _run(8.0, 3.0),
        "priority/without/1/1": _run(12.0, 3.0),
    }
    priority = pooled_priority(cfg, results)
    assert priority["per_seed"] == [
        {
            "seed": 5,
            "high_p99_ttft_s": 1.0,
            "high_p99_ttft_no_priority_s": 5.0,
            "high_p99_tpot_s": 0.04,
            "high_p99_tpot_no_priority_s": 0.04,
            "normal_p99_ttft_s": 12.0,
            "normal_p99_ttft_no_priority_s": 10.0,
            "normal_p99_tpot_s": 0.05,
            "normal_p99_tpot_no_priority_s": 0.05,
            "normal_p99_ttft_cost_pct": 20.0,
            "high_p99_ttft_speedup": 5.0,
            "normal_p99_ttft_one_run_spread_pct": 0.0,
        },
        {
            "seed": 6,
            "high_p99_ttft_s": 2.0,
            "high_p99_ttft_no_priority_s": 3.0,
            "high_p99_tpot_s": 0.04,
            "high_p99_tpot_no_priority_s": 0.04,
            "normal_p99_ttft_s": 9.0,
            "normal_p99_ttft_no_priority_s": 10.0,
            "normal_p99_tpot_s": 0.05,
            "normal_p99_tpot_no_priority_s": 0.05,
            "normal_p99_ttft_cost_pct": -10.0,
            "high_p99_ttft_speedup": 1.5,
            "normal_p99_ttft_one_run_spread_pct": 20.0,
        },
    ]
    assert priority["max_normal_p99_ttft_cost_pct"] == 20.0
    assert (priority["seeds"], priority["replicas"]) == ([5, 6], 2)
    # Pooled over every request of both seeds and replicas: [9, 9, 11, 13] with priority.
    assert priority["normal_p99_ttft_s"] == 12.94
    assert priority["high_p99_ttft_s"] == 2.0  # [1, 1, 2, 2]
    assert priority["high_p99_tpot_s"] == 0.04


def test_only_the_priority_part(report):
    only = run_compare(dataclasses.replace(TINY, parts=("priority",)))
    assert list(only) == ["priority", "config"]
    assert only["priority"] == report["priority"]
    assert only["config"]["parts"] == ["priority"]
    text = compare_tables(only)
    assert "Per seed" in text and "worst seed" in text
    assert "Policy comparison" not in text and "Auto-scaling" not in text


def test_tables_show_every_policy(report):
    text = compare_tables(report)
    for name in POLICY_NAMES:
        assert name in text
    assert "Priorities" in text and "Auto-scaling" in text and "Fidelity" in text


def test_policy_configs():
    base = SimConfig()
    assert (
        policy_config("round_robin", base).dispatch,
        policy_config("round_robin", base).migration,
    ) == (
        "round_robin",
        "none",
    )
    assert policy_config("load_balance", base).migration == "none"
    assert policy_config("llumnix", base).load_model.enable_defrag is True
    assert policy_config("llumnix_no_defrag", base).load_model.enable_defrag is False
    with pytest.raises(ValueError, match="policy 'fifo' is not one of"):
        policy_config("fifo", base)


def test_compare_config_validation():
    with pytest.raises(ValueError, match="rates=()"):
        CompareConfig(rates=())
    with pytest.raises(ValueError, match="autoscale_min_instances=20"):
        CompareConfig(autoscale_min_instances=20)
    with pytest.raises(ValueError, match="not one of"):
        CompareConfig(prompt="weird:1")
    with pytest.raises(ValueError, match="priority_seeds=0"):
        CompareConfig(priority_seeds=0)
    with pytest.raises(ValueError, match="priority_replicas=0"):
        CompareConfig(priority_replicas=0)
    with pytest.raises(ValueError, match=r"parts=\('bogus',\)"):
        CompareConfig(parts=("bogus",))


def test_cli_single_run_ends_with_json(capsys):
    code = main(
        [
            "simulate",
            "--profile",
            "tiny-cpu",
            "--instances",
            "2",
            "--requests",
            "40",
            "--rate",
            "500",
            "--prompt",
            "uniform:8:32",
            "--output",
            "fixed:8",
            "--json",
        ]
    )
    assert code == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["policy"] == "llumnix"
    assert last["num_requests"] == 40


def test_cli_replays_a_trace(tmp_path, capsys):
    trace = tmp_path / "t.csv"
    trace.write_text("arrival_time_s,prompt_len,output_len,priority\n0,10,5,0\n0.001,20,3,1\n")
    code = main(
        [
            "simulate",
            "--profile",
            "tiny-cpu",
            "--instances",
            "2",
            "--trace",
            str(trace),
            "--priority",
        ]
    )
    assert code == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["num_requests"] == 2
    assert last["high"]["num_requests"] == 1


def test_cli_reports_bad_input(capsys):
    assert main(["simulate", "--prompt", "zipf:1"]) == 2
    assert "zipf takes 3 parameter(s)" in capsys.readouterr().err


def test_plot_is_written_when_matplotlib_is_there(report, tmp_path):
    pytest.importorskip("matplotlib")
    from services.simulator.report import plot_compare

    path = plot_compare(report, tmp_path / "plot.png")
    assert path == str(tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fidelity_job_carries_the_measured_mesh_costs():
    cfg = dataclasses.replace(
        TINY,
        fidelity_seed=5,
        fidelity_dispatch_latency_s=0.01,
        fidelity_step_overhead_s=0.002,
        fidelity_host_cores=2,
        fidelity_stream_cpu_per_token_s=0.001,
    )
    (job,) = fidelity_jobs(cfg)
    assert (
        job.config.dispatch,
        job.config.migration,
        job.config.dispatch_latency_s,
        job.config.step_overhead_s,
        job.config.host_cores,
        job.config.stream_cpu_per_token_s,
    ) == ("freest", "none", 0.01, 0.002, 2, 0.001)
    assert (job.workload.seed, job.workload.num_requests, job.workload.rate) == (5, 30, 200.0)
    (default,) = fidelity_jobs(TINY)
    assert (default.workload.seed, default.config.host_cores) == (TINY.seed, None)


COMPARE_ARGS = [
    "simulate",
    "--compare",
    "--json",
    "--profile",
    "tiny-cpu",
    "--instances",
    "4",
    "--requests",
    "60",
    "--rates",
    "200,800,2000",
    "--priority-rate",
    "2000",
    "--prompt",
    "uniform:8:64",
    "--output",
    "uniform:4:32",
    "--workers",
    "1",
]


def test_cli_compare_takes_the_real_side_and_its_sim_config(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    sim_config = {
        "fidelity_instances": 2,
        "fidelity_requests": 20,
        "fidelity_rate": 100.0,
        "fidelity_profile": "tiny-cpu",
        "fidelity_seed": 1,
        "fidelity_dispatch_latency_s": 0.01,
        "fidelity_step_overhead_s": 0.002,
        "fidelity_host_cores": 2,
        "fidelity_stream_cpu_per_token_s": 0.0005,
    }
    real = tmp_path / "real.json"
    real.write_text(
        json.dumps({"real_mean_ttft_s": 0.05, "real_mean_tpot_s": 0.008, "sim_config": sim_config})
    )
    plot = tmp_path / "compare.png"
    assert main([*COMPARE_ARGS, "--fidelity-real", str(real), "--plot", str(plot)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    report = json.loads(lines[-1])
    assert lines[-2] == f"plot: wrote {plot}"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fidelity = report["fidelity"]
    assert (fidelity["real_mean_ttft_s"], fidelity["real_mean_tpot_s"]) == (0.05, 0.008)
    # The sim side is the bench's workload and mesh costs, simulated again.
    (job,) = fidelity_jobs(CompareConfig(**sim_config))
    expected = run_job(job)
    assert (fidelity["sim_mean_ttft_s"], fidelity["sim_mean_tpot_s"]) == (
        expected["mean_ttft_s"],
        expected["mean_tpot_s"],
    )


def test_cli_compare_says_when_matplotlib_is_missing(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    plot = tmp_path / "compare.png"
    assert main([*COMPARE_ARGS, "--plot", str(plot)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2] == "plot: skipped, matplotlib is not installed (it comes with the bench extra)"
    assert not plot.exists()
    assert json.loads(lines[-1])["fidelity"]["real_mean_ttft_s"] is None


def test_cli_compare_only_priority(capsys):
    args = [*COMPARE_ARGS, "--only", "priority", "--priority-seeds", "1"]
    assert main([*args, "--priority-replicas", "2", "--priority-headroom", "4"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    report = json.loads(lines[-1])
    assert list(report) == ["priority", "config"]
    assert lines[-2] == "plot: skipped (it needs the compare, autoscale and fidelity parts)"
    priority = report["priority"]
    assert (priority["replicas"], priority["headroom_blocks"], priority["seeds"]) == (2, 4, [0])
    (row,) = priority["per_seed"]
    assert priority["max_normal_p99_ttft_cost_pct"] == row["normal_p99_ttft_cost_pct"]
