"""A group's pipeline stages on a shared host (SimConfig.host_cores), as an instance's
steps: every stage's compute is a job on the host's cores, plus the step overhead."""

import dataclasses

import pytest

from services.simulator.workload import SimRequest
from tests.unit.simulator.test_groups import TINY, ScriptedGroups, scripted_run

ARRIVAL_S = 0.05


def _group_run(num_requests, **changes):
    # The group of two forms at the first tick (10 ms), before the requests arrive: no
    # KV to exchange; the links are so fast that activations take no time.
    config = dataclasses.replace(TINY, migration_bandwidth_bytes_per_s=1e18, **changes)
    requests = [SimRequest(f"r{i}", ARRIVAL_S, 40, 30) for i in range(num_requests)]
    _, result = scripted_run(config, requests, ScriptedGroups(["i00", "i01"], drop_at=0.0))
    assert result.groups.num_drops == 1
    return result.makespan_s - ARRIVAL_S


def test_one_request_on_half_a_core_takes_twice_as_long():
    # One request is in one micro-batch at a time: one stage job runs, at half speed.
    assert _group_run(1, host_cores=0.5) == pytest.approx(2 * _group_run(1))


def test_a_core_per_stage_shares_nothing():
    assert _group_run(4, host_cores=2.0) == pytest.approx(_group_run(4))


def test_two_stages_on_one_core_slow_each_other():
    assert _group_run(4, host_cores=1.0) > 1.2 * _group_run(4)


def test_every_stage_pays_the_step_overhead():
    # 30 micro-batches (the prefill, 29 decodes) through 2 stages, 1 ms each.
    assert _group_run(1, step_overhead_s=0.001) == pytest.approx(_group_run(1) + 30 * 2 * 0.001)


def _join_run(**changes):
    config = dataclasses.replace(TINY, migration_bandwidth_bytes_per_s=1e18, **changes)
    policy = ScriptedGroups(["i00", "i01"], drop_at=0.0)
    _, result = scripted_run(config, [SimRequest("r0", ARRIVAL_S, 40, 30)], policy)
    return policy, result


def test_a_group_serves_once_every_member_has_joined():
    # Decided at the first tick (10 ms; both members idle): they join at once, 50 ms each.
    policy, result = _join_run(group_join_s=0.05)
    [(_, formed_s)] = policy.formed
    assert result.groups.decided_times_s == [pytest.approx(0.01)]
    assert formed_s == result.groups.drop_times_s[0] == pytest.approx(0.06)
    # On one shared core the two joins run side by side at half speed each.
    policy, _ = _join_run(group_join_s=0.05, host_cores=1.0)
    assert policy.formed[0][1] == pytest.approx(0.11)


def test_negative_join_time_is_rejected():
    from services.common.config import ConfigError

    with pytest.raises(ConfigError, match="group_join_s"):
        dataclasses.replace(TINY, group_join_s=-1.0)


def _two_member_drop(members=("i00", "i01"), **changes):
    config = dataclasses.replace(TINY, migration_bandwidth_bytes_per_s=1e18, **changes)
    policy = ScriptedGroups(list(members), drop_at=0.02)  # mid-decode of both
    requests = [SimRequest(f"r{i}", 0.0, 40, 60) for i in range(2)]
    sim, result = scripted_run(config, requests, policy)
    assert result.groups.decided_times_s == [pytest.approx(0.02)]
    return policy.formed[0][1], [inst.num_steps for inst in sim.instances.values()]


def test_the_two_phase_join_costs_each_member_one_more_step():
    # One phase: each member joins at its first boundary after the decision. Two (the
    # live PrepareJoin then JoinGroup): it prepares there, steps once more, then joins.
    one_formed_s, one_steps = _two_member_drop()
    two_formed_s, two_steps = _two_member_drop(group_two_phase_join=True)
    assert two_steps == [n + 1 for n in one_steps] and one_steps[0] == one_steps[1]
    assert two_formed_s > one_formed_s
    # The join's work starts at that second boundary.
    joined_s, _ = _two_member_drop(group_two_phase_join=True, group_join_s=0.05)
    assert joined_s == pytest.approx(two_formed_s + 0.05)


def test_stage_0_that_prepares_last_joins_at_that_boundary():
    # Both members reach their boundary at the same instant, i00 first. With i01 as
    # stage 0 it prepares last, and its own JoinGroup (a local call) runs before its
    # next step: it takes no extra step, the member i00 still takes one.
    _, one_steps = _two_member_drop()
    _, steps = _two_member_drop(("i01", "i00"), group_two_phase_join=True)
    assert steps == [one_steps[0] + 1, one_steps[1]]
    # Stage 0 first (i00), the member last: JoinGroup reaches the member over the
    # network, after it started its next step.
    _, steps = _two_member_drop(("i00", "i01"), group_two_phase_join=True)
    assert steps == [n + 1 for n in one_steps]
