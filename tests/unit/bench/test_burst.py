"""`llmesh bench burst`'s pure parts: the workload, the summary's ratios, and the
simulator run built from the bench's own config (bench/burst.py, _burst_workload.py,
_burst_sim.py, _burst_report.py)."""

import math

import pytest

from bench import _burst_sim
from bench._burst_report import add_ratios
from bench._burst_run import GROUP_KNOBS
from bench._burst_workload import workload
from bench._checkpoint import llama_config
from bench.burst import MODEL_SHAPE, POLICIES, _parse
from services.worker.engine.cost_model import TINY_CPU, CostModelProfile

SMALL = ["--residents", "4", "--burst", "6", "--tail", "2", "--resident-prompt", "120",
         "--resident-tokens", "40", "--burst-prompt", "32", "--burst-tokens", "8"]  # fmt: skip


def bench_profile() -> CostModelProfile:
    """The bench model with tiny-cpu's coefficients, in the workers' memory."""
    config = llama_config(**MODEL_SHAPE)
    return CostModelProfile(
        name="bench-burst-test",
        model=config,
        dtype="float32",
        fixed_s=TINY_CPU.fixed_s,
        per_token_s=TINY_CPU.per_token_s,
        per_seq_s=0.0,
        per_context_token_s=TINY_CPU.per_context_token_s,
        per_attention_pair_s=TINY_CPU.per_attention_pair_s,
        memory_capacity_bytes=round(config.num_params() * 4 / 0.55),
    )


# ---- the workload ---------------------------------------------------------------------------


def test_the_workload_is_deterministic_in_the_seed():
    args = _parse([])
    assert workload(args) == workload(args)
    assert workload(args) != workload(_parse(["--seed", "8"]))


def test_the_workload_is_residents_then_a_burst_then_a_tail():
    args = _parse([])
    arrivals = workload(args)
    assert len(arrivals) == 20 + 24 + 4
    assert [a.at_s for a in arrivals] == sorted(a.at_s for a in arrivals)
    by_kind = {"resident": [], "burst": [], "tail": []}
    for a in arrivals:
        prompt, sampling = a.request
        if len(prompt) >= 400:
            by_kind["resident"].append(a)
            assert 0 <= a.at_s <= 1.0 and 225 <= sampling["max_tokens"] <= 300
        elif sampling["max_tokens"] == 64 and 3.0 <= a.at_s <= 4.0:
            by_kind["burst"].append(a)
            assert 64 <= len(prompt) <= 128
        else:
            by_kind["tail"].append(a)
            assert a.at_s > 4.0 and 32 <= len(prompt) <= 96
        assert sampling["ignore_eos"] and sampling["temperature"] in (0.0, 0.8)
    assert [len(v) for v in by_kind.values()] == [20, 24, 4]
    # Request k: greedy when odd, seeded sampling when even, seed 5000 + k.
    seeds = sorted(a.request[1]["seed"] for a in arrivals)
    assert seeds == list(range(5000, 5048))


# ---- the simulator's side -------------------------------------------------------------------


def test_the_simulated_engine_holds_the_workers_159_blocks():
    engine = _burst_sim.engine_knobs(bench_profile(), 4, 16, 64)
    assert engine == {
        "num_instances": 4,
        "block_size": 16,
        "max_num_seqs": 64,
        "max_num_batched_tokens": 512,  # the worker's EngineConfig default
        "max_model_len": 159 * 16,
        "num_kv_blocks": 159,
    }


def test_the_sim_config_is_the_live_schedulers_with_the_bench_knobs():
    engine = _burst_sim.engine_knobs(bench_profile(), 4, 16, 64)
    del engine["num_kv_blocks"]
    costs = {
        "dispatch_latency_s": 0.01,
        "step_overhead_s": 0.002,
        "host_cores": 2.0,
        "stream_cpu_per_token_s": 0.0003,
    }
    config = _burst_sim.sim_config("kunserve", GROUP_KNOBS, costs, **engine)
    assert (config.dispatch, config.migration, config.group) == ("load_balance", "none", "kunserve")
    group = config.group_config
    assert (group.interval_s, group.vote_window_s, group.hold_s, group.restore_window_s) == (
        0.1,
        0.5,
        2.0,
        1.0,
    )
    assert (group.vote_demand_at_least, group.restore_usage_at_most) == (0.95, 0.5)  # defaults
    assert config.migration_config.interval_s == 0.05
    assert (config.num_instances, config.max_num_batched_tokens, config.max_num_seqs) == (
        4,
        512,
        64,
    )
    assert (config.dispatch_latency_s, config.step_overhead_s, config.host_cores) == (
        0.01,
        0.002,
        2.0,
    )
    assert config.stream_cpu_per_token_s == 0.0003
    llmesh = _burst_sim.sim_config("llmesh", GROUP_KNOBS, costs, **engine)
    assert (llmesh.dispatch, llmesh.migration, llmesh.group) == ("freest", "freeness", "llmesh")
    # The live worker's admission and load reports (services/worker/llumlet.py, Intake).
    assert (config.live_admission, config.load_at_step_end) == (True, True)


def test_a_run_s_measured_step_cost_scales_every_simulated_step():
    profile = bench_profile()
    engine = _burst_sim.engine_knobs(profile, 4, 16, 64)
    costs = {"dispatch_latency_s": 0.0, "step_overhead_s": 0.0, "host_cores": None}
    sim = _burst_sim.sim_block(profile, 0.0, costs, engine, GROUP_KNOBS)
    arrivals = workload(_parse(SMALL))
    plain = _burst_sim.simulate("recompute", sim, arrivals)
    same = _burst_sim.simulate("recompute", sim, arrivals, cost_scale=1.0)
    dearer = _burst_sim.simulate("recompute", sim, arrivals, cost_scale=2.0)
    assert (plain["cost_scale"], same["cost_scale"], dearer["cost_scale"]) == (None, 1.0, 2.0)
    assert same["ttfts_s"] == plain["ttfts_s"]
    # Every request's first token needs at least its prefill step: each comes later.
    assert all(d > p for d, p in zip(dearer["ttfts_s"], plain["ttfts_s"], strict=True))


def test_sim_requests_keep_times_and_lengths():
    arrivals = workload(_parse(SMALL))
    requests = _burst_sim.sim_requests(arrivals)
    assert [(r.request_id, r.arrival_s) for r in requests] == [
        (str(k), a.at_s) for k, a in enumerate(arrivals)
    ]
    assert [(r.num_prompt_tokens, r.num_output_tokens) for r in requests] == [
        (len(a.request[0]), a.request[1]["max_tokens"]) for a in arrivals
    ]


def test_every_policy_simulates_a_small_burst():
    profile = bench_profile()
    engine = _burst_sim.engine_knobs(profile, 4, 16, 64)
    costs = {"dispatch_latency_s": 0.0, "step_overhead_s": 0.0, "host_cores": 2.0}
    sim = _burst_sim.sim_block(profile, 0.0, costs, engine, GROUP_KNOBS)
    arrivals = workload(_parse(SMALL))
    for policy in POLICIES:
        figures = _burst_sim.simulate(policy, sim, arrivals)
        assert set(figures) == {
            "p50_ttft_s", "p99_ttft_s", "drops", "restores", "migrations", "preemptions",
            "makespan_s", "background_jobs", "slowest_ttft", "drop_times_s", "decided_times_s",
            "ttfts_s", "cost_scale",
        }  # fmt: skip
        # 12 short requests fit 4 x 159 blocks: nobody preempts, nobody drops.
        assert (figures["drops"], figures["preemptions"], figures["drop_times_s"]) == (0, 0, [])
        assert figures["decided_times_s"] == []
        assert 0 < figures["p50_ttft_s"] <= figures["p99_ttft_s"]
        [[first, slowest_s], *rest] = figures["slowest_ttft"]
        assert len(figures["ttfts_s"]) == len(arrivals)
        assert figures["ttfts_s"][first] == slowest_s == max(figures["ttfts_s"])
        assert len(rest) == 2 and 0 <= first < len(arrivals)
        assert slowest_s >= max(t for _, t in rest)


# ---- the summary ------------------------------------------------------------------------------


def test_fidelity_and_the_kunserve_target_come_from_the_p99s():
    summary = {
        "policies": {
            "recompute": {"p99_ttft_s": 40.0, "drops": 0},
            "kunserve": {"p99_ttft_s": 10.0, "drops": 2},
        },
        "sim_p99_ttft_s": {"recompute": 44.0, "kunserve": 7.0},
    }
    add_ratios(summary)
    assert summary["fidelity"] == {"recompute": 1.1, "kunserve": 0.7}
    assert summary["fidelity_within_25pct"] is False
    assert summary["kunserve_p99_ttft_speedup_vs_recompute"] == 4.0
    assert summary["kunserve_target_met"] is True


def test_percentile_is_nearest_rank():
    assert _burst_sim.percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert _burst_sim.percentile(list(range(101)), 99) == 99
    assert math.isnan(_burst_sim.percentile([], 99))


def test_probes_count_in_cpu_seconds_of_a_lone_job():
    from bench.simulator_fidelity import Probes

    profile = bench_profile()
    # Each of the mesh's runnable threads had half a core during the probes.
    probes = Probes(
        prompt_len=100, ttfts=[0.5, 0.7], tpots=[0.04, 0.06], stream_cpu_per_token_s=1e-4
    )
    alone = _burst_sim.mesh_costs(profile, probes, 2)
    loaded = _burst_sim.mesh_costs(profile, probes, 2, probe_speed=0.5)
    halved = Probes(100, [0.25, 0.35], [0.02, 0.03], 1e-4)
    assert loaded == _burst_sim.mesh_costs(profile, halved, 2)
    assert loaded["step_overhead_s"] < alone["step_overhead_s"]
    assert (loaded["host_cores"], loaded["stream_cpu_per_token_s"]) == (2, 1e-4)


def test_the_effective_background_gives_the_mesh_the_cpu_it_got():
    from bench._cpu import effective_background

    # 5 runnable threads of the mesh got 1.25 of 2 cores: a quarter core each = 2 / (5 + 3).
    assert effective_background(2, 5.0, 1.25) == pytest.approx(3.0)
    # 1 thread at a full core: nothing was in its way.
    assert effective_background(2, 1.0, 1.0) == 1.0  # c / (1 + 1) = 1: full speed
    assert effective_background(2, None, 1.0) is None


def test_the_bench_reads_its_group_knobs_as_the_live_scheduler_does():
    from services.common.config import load_config
    from services.policies import MigrationConfig
    from services.scheduler.__main__ import parse_args
    from services.scheduler.config import SchedulerConfig

    live = load_config(
        SchedulerConfig,
        "SCHEDULER",
        vars(parse_args(["--policy", "llmesh", *GROUP_KNOBS])),
        environ={},
    )
    assert _burst_sim.group_config(GROUP_KNOBS) == live.group_config()
    assert MigrationConfig() == live.migration_config()
    with pytest.raises(ValueError, match="--migration-interval-s is not a group knob"):
        _burst_sim.group_config(("--migration-interval-s", "1"))


def test_slowest_names_the_requests_p99_is_about():
    from bench._burst_sim import slowest

    ttfts = {0: 1.0, 1: 7.25, 2: 3.5, 3: 7.25, 4: 0.2}
    assert slowest(ttfts) == [[1, 7.25], [3, 7.25], [2, 3.5]]
    assert slowest(ttfts, count=1) == [[1, 7.25]]
    assert slowest({}) == []


def test_live_drop_times_are_read_from_the_scheduler_log_clock():
    from bench._burst_run import _log_time

    event = {"event": "group_serving", "timestamp": "2026-12-06T03:12:51.230000Z"}
    assert _log_time(event) == 1796526771.23
