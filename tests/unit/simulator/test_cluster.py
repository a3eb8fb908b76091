"""Whole-cluster simulations on the tiny CPU profile with small KV pools (fast)."""

import dataclasses

import pytest

from services.policies import (
    LoadModelConfig,
    MigrationConfig,
    ScalingConfig,
)
from services.policies.dispatch import DispatchPolicy
from services.simulator.cluster import Simulator
from services.simulator.config import SimConfig
from services.simulator.workload import SimRequest, WorkloadConfig, generate, parse_length

# 40 blocks of 16 tokens = 640 tokens per instance: a handful of requests fill it.
BASE = SimConfig(
    num_instances=3,
    profile="tiny-cpu",
    num_kv_blocks=40,
    max_model_len=256,
    max_num_batched_tokens=256,
)
WORKLOAD = WorkloadConfig(
    num_requests=80,
    rate=1000.0,
    arrival="gamma",
    cv=2.0,
    prompt=parse_length("uniform:8:96"),
    output=parse_length("uniform:4:64"),
    max_total_tokens=256,
    seed=3,
)


def run(config=BASE, workload=WORKLOAD, requests=None):
    return Simulator(config, requests or generate(workload)).run()


def fingerprint(result):
    return [
        (
            r.request_id,
            r.first_token_s,
            r.finish_s,
            r.num_preemptions,
            r.preemption_loss_s,
            r.num_migrations,
            r.instance_id,
        )
        for r in result.records
    ]


class FirstInstanceDispatch(DispatchPolicy):
    """Floods the lowest-id instance that is not terminating."""

    def choose(self, loads, request):
        ids = sorted(ld.instance_id for ld in loads if not ld.is_terminating)
        return ids[0] if ids else None


def run_flooded(config, requests):
    sim = Simulator(config, requests)
    sim.dispatch_policy = FirstInstanceDispatch()
    return sim.run()


def test_same_seed_same_results():
    first, second = run(), run()
    assert fingerprint(first) == fingerprint(second)
    assert first.summary == second.summary
    assert first.num_events == second.num_events


def test_every_request_finishes_exactly_once_with_all_its_tokens():
    result = run()
    assert len(result.records) == 80
    assert all(r.num_finishes == 1 for r in result.records)
    assert all(r.num_generated == r.num_output_tokens for r in result.records)
    assert all(r.arrival_s <= r.first_token_s <= r.finish_s for r in result.records)


def test_blocks_balance_at_the_end():
    sim = Simulator(BASE, generate(WORKLOAD))
    sim.run()  # raises SimulationError if an engine is not empty or its books do not balance
    for instance in sim.instances.values():
        instance.engine.check_integrity()
        assert instance.block_manager.num_free_blocks == 40


def test_overload_preempts_and_counts_the_loss():
    config = dataclasses.replace(BASE, dispatch="round_robin", migration="none")
    result = run(config)
    preempted = [r for r in result.records if r.num_preemptions]
    assert result.summary.preemptions == sum(r.num_preemptions for r in preempted) > 0
    assert all(r.preemption_loss_s > 0 for r in preempted)
    assert result.summary.migrations == 0


def test_flooded_instance_migrates_requests_away():
    config = dataclasses.replace(BASE, num_instances=2, num_kv_blocks=64)
    requests = [SimRequest(f"r{i:02d}", i * 0.001, 40, 60) for i in range(12)]
    result = run_flooded(config, requests)
    moved = [r for r in result.records if r.num_migrations]
    assert result.migration.num_committed == result.summary.migrations > 0
    assert {r.instance_id for r in moved} <= {"i00", "i01"}
    assert any(r.instance_id == "i01" for r in result.records)
    assert all(r.num_generated == 60 for r in result.records)


def test_without_migration_the_flooded_instance_serves_everything():
    config = dataclasses.replace(BASE, num_instances=2, num_kv_blocks=64, migration="none")
    requests = [SimRequest(f"r{i:02d}", i * 0.001, 40, 60) for i in range(12)]
    result = run_flooded(config, requests)
    assert {r.instance_id for r in result.records} == {"i00"}
    assert result.summary.preemptions > 0


def test_migration_downtime_stays_below_the_last_stage_copy():
    config = dataclasses.replace(BASE, num_instances=2, num_kv_blocks=64)
    requests = [SimRequest(f"r{i:02d}", i * 0.001, 40 + 10 * i, 60) for i in range(12)]
    sim = Simulator(config, requests)
    sim.dispatch_policy = FirstInstanceDispatch()
    result = sim.run()
    assert result.migration.num_committed > 0
    # Whatever the request's length, only <= last_stage_max_blocks blocks are copied
    # while it is suspended.
    assert result.migration.max_downtime_s <= sim.migrations.cost.copy_s(
        config.last_stage_max_blocks
    )


def test_slow_link_aborts_migrations_of_requests_that_finish_first():
    config = dataclasses.replace(
        BASE, num_instances=2, num_kv_blocks=64, migration_bandwidth_bytes_per_s=1e4
    )
    requests = [SimRequest(f"r{i:02d}", i * 0.001, 40, 60) for i in range(12)]
    result = run_flooded(config, requests)
    assert result.migration.num_aborted > 0
    assert all(r.num_finishes == 1 for r in result.records)


def test_scale_down_drains_idle_instances_without_losing_requests():
    scaling = ScalingConfig(
        interval_s=0.05, scale_up_freeness=1.0, scale_down_freeness=5.0, cooldown_s=0.1
    )
    config = dataclasses.replace(BASE, num_instances=4, num_kv_blocks=64, scaling=scaling)
    workload = dataclasses.replace(WORKLOAD, num_requests=40, rate=50.0)
    result = run(config, workload)
    assert len(result.records) == 40 and all(r.num_finishes == 1 for r in result.records)
    assert min(n for _, n in result.instance_timeline) < 4
    assert result.instance_seconds < 4 * result.makespan_s


def test_scale_up_adds_instances_under_load():
    scaling = ScalingConfig(
        interval_s=0.05,
        scale_up_freeness=8.0,
        scale_down_freeness=500.0,
        cooldown_s=0.2,
        max_instances=4,
    )
    config = dataclasses.replace(
        BASE, num_instances=1, num_kv_blocks=64, scaling=scaling, instance_startup_s=0.1
    )
    result = run(config)
    assert max(n for _, n in result.instance_timeline) > 1
    assert {r.instance_id for r in result.records} - {"i00"}
    assert all(r.num_finishes == 1 for r in result.records)


def test_priority_scheduling_serves_high_priority_first():
    workload = dataclasses.replace(WORKLOAD, num_requests=120, high_priority_fraction=0.2)
    requests = generate(workload)
    with_priority = dataclasses.replace(
        BASE,
        scheduling_policy="priority",
        load_model=LoadModelConfig(high_priority_headroom_blocks=8),
    )
    without = dataclasses.replace(BASE, use_priorities=False)
    high_with = run(with_priority, requests=requests).summary_for(is_high_priority=True)
    high_without = run(without, requests=requests).summary_for(is_high_priority=True)
    assert high_with.mean_ttft_s < high_without.mean_ttft_s


def test_no_defrag_variant_runs_the_same_workload():
    config = dataclasses.replace(BASE, load_model=LoadModelConfig(enable_defrag=False))
    result = run(config)
    assert all(r.num_finishes == 1 for r in result.records)


def test_tight_thresholds_are_configurable():
    config = dataclasses.replace(
        BASE, migration_config=MigrationConfig(src_freeness_below=1.0, dst_freeness_above=2.0)
    )
    assert all(r.num_finishes == 1 for r in run(config).records)


def test_config_rejects_requests_longer_than_the_context():
    with pytest.raises(ValueError, match="exceed max_model_len=256"):
        Simulator(BASE, [SimRequest("r0", 0.0, 200, 100)])


def test_config_rejects_a_context_larger_than_the_pool():
    config = dataclasses.replace(BASE, num_kv_blocks=8)
    with pytest.raises(ValueError, match="does not fit a pool of 8 blocks"):
        Simulator(config, [])


def test_config_rejects_unsorted_requests():
    requests = [SimRequest("a", 1.0, 8, 8), SimRequest("b", 0.5, 8, 8)]
    with pytest.raises(ValueError, match="sorted by arrival time"):
        Simulator(BASE, requests)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_instances": 0}, "num_instances=0"),
        ({"dispatch": "nope"}, "dispatch='nope'"),
        ({"migration": "nope"}, "migration='nope'"),
        ({"selection": "nope"}, "selection='nope'"),
        ({"scheduling_policy": "lifo"}, "scheduling_policy='lifo'"),
        ({"migration_bandwidth_bytes_per_s": 0}, "migration_bandwidth_bytes_per_s=0"),
        ({"host_cores": 0}, "host_cores=0 must be > 0"),
        ({"stream_cpu_per_token_s": -1.0}, "stream_cpu_per_token_s=-1.0"),
    ],
)
def test_sim_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SimConfig(**kwargs)


def test_dispatch_latency_adds_to_every_ttft():
    requests = [SimRequest("r0", 0.0, 16, 4), SimRequest("r1", 5.0, 16, 4)]
    ideal = run(requests=requests)
    delayed = run(dataclasses.replace(BASE, dispatch_latency_s=0.25), requests=requests)
    for a, b in zip(ideal.records, delayed.records, strict=True):
        assert b.ttft_s == pytest.approx(a.ttft_s + 0.25)
        assert b.tpot_s == pytest.approx(a.tpot_s)


def test_step_overhead_stretches_every_step():
    requests = [SimRequest("r0", 0.0, 16, 5)]
    ideal = run(requests=requests).records[0]
    slow = run(dataclasses.replace(BASE, step_overhead_s=0.01), requests=requests).records[0]
    assert slow.tpot_s == pytest.approx(ideal.tpot_s + 0.01)
    assert slow.ttft_s == pytest.approx(ideal.ttft_s + 0.01)


# ---- a shared host (the fidelity bench's one-machine mesh) ----------------------------


def test_a_host_with_a_core_per_job_changes_nothing():
    shared = dataclasses.replace(
        BASE, host_cores=64, dispatch_latency_s=0.002, stream_cpu_per_token_s=0.0001
    )
    ideal = dataclasses.replace(BASE, dispatch_latency_s=0.002)
    assert fingerprint(run(shared)) == fingerprint(run(ideal))


def test_steps_on_one_shared_core_take_turns():
    # Two instances, one request each at t=0: alone, each prefill takes d; on one core
    # both run at half speed and end together at 2d.
    config = dataclasses.replace(BASE, num_instances=2, migration="none")
    requests = [SimRequest("r0", 0.0, 32, 1), SimRequest("r1", 0.0, 32, 1)]
    alone = run(config, requests=requests[:1]).records[0].ttft_s
    shared = run(dataclasses.replace(config, host_cores=1), requests=requests)
    assert {r.instance_id for r in shared.records} == {"i00", "i01"}
    assert [r.ttft_s for r in shared.records] == [pytest.approx(2 * alone)] * 2
    two_cores = run(dataclasses.replace(config, host_cores=2), requests=requests)
    assert [r.ttft_s for r in two_cores.records] == [pytest.approx(alone)] * 2


def test_streaming_tokens_competes_with_the_next_step():
    # One core: after each step its token's streaming (s) runs beside the next step (d);
    # both at half speed until the stream is done (2s), then the step alone: d + s per
    # token, as long as s < d.
    requests = [SimRequest("r0", 0.0, 16, 5)]
    ideal = run(requests=requests).records[0]
    s = ideal.tpot_s / 2  # d is the profile's decode step: keep s below it whatever d is
    shared = run(
        dataclasses.replace(BASE, host_cores=1, stream_cpu_per_token_s=s), requests=requests
    ).records[0]
    assert shared.ttft_s == pytest.approx(ideal.ttft_s)
    assert shared.tpot_s == pytest.approx(ideal.tpot_s + s)


def test_dispatch_on_a_shared_host_is_work_on_its_cores():
    # One core, two requests at t=0: both dispatches (L) run at half speed and end at
    # 2L, then both prefills (d) on two instances, at half speed too: 2L + 2d each,
    # twice what one request alone takes (L + d).
    config = dataclasses.replace(BASE, host_cores=1, dispatch_latency_s=0.004, migration="none")
    requests = [SimRequest("r0", 0.0, 32, 1), SimRequest("r1", 0.0, 32, 1)]
    ideal = run(requests=requests[:1]).records[0].ttft_s
    alone = run(config, requests=requests[:1]).records[0].ttft_s
    assert alone == pytest.approx(ideal + 0.004)
    both = run(config, requests=requests).records
    assert [r.ttft_s for r in both] == [pytest.approx(2 * alone)] * 2
