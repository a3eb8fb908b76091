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
    } <= set(report["priority"])
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
    # One seed: the pooled P99s are that seed's own.
    one = dataclasses.replace(TINY, priority_seeds=1, seed=2)
    jobs = priority_jobs(one)
    assert [j.label for j in jobs] == ["priority/with/0", "priority/without/0"]
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
