import math

import pytest

from services.common.config import ConfigError
from services.policies import (
    SCALING_POLICIES,
    ScaleAction,
    ScaleDecision,
    ScalingConfig,
    average_freeness,
    make_scaling_policy,
)
from tests.unit.policies.snapshots import load

CONFIG = ScalingConfig(
    scale_up_freeness=10.0, scale_down_freeness=40.0, cooldown_s=5.0, max_instances=4
)
NONE = ScaleDecision(ScaleAction.NONE)


def policy(**changes):
    fields = {**CONFIG.__dict__, **changes}
    return make_scaling_policy("freeness_band", config=ScalingConfig(**fields))


def test_registered_scaling_names():
    assert sorted(SCALING_POLICIES) == ["freeness_band"]


def test_average_freeness_treats_the_cluster_as_one_instance():
    # (200 - 170) / 20
    assert average_freeness([load("a", 90, 10), load("b", 80, 10)]) == 1.5


def test_average_freeness_skips_terminating_instances():
    loads = [load("a", 90, 10), load("t", 0, 0, terminating=True)]
    assert average_freeness(loads) == 1.0


def test_average_freeness_without_one_drops_its_capacity_but_keeps_its_load():
    loads = [load("a", 10, 1), load("b", 0, 0), load("c", 20, 2)]
    assert average_freeness(loads, without="b") == (200 - 30) / 3


def test_average_freeness_of_an_empty_cluster_is_infinite():
    assert average_freeness([]) == math.inf


def test_scales_up_below_the_band_by_enough_instances_to_reach_its_middle():
    # Middle of [10, 40] is 25: 25 * 20 + 170 - 200 = 470 blocks = 5 instances of 100,
    # capped by max_instances (4) - 2 alive.
    decision = policy().decide([load("a", 90, 10), load("b", 80, 10)], now=0.0)
    assert decision == ScaleDecision(ScaleAction.UP, None, "average freeness 1.5", 2)
    decision = policy(max_instances=10).decide([load("a", 90, 10), load("b", 80, 10)], now=0.0)
    assert decision.num_instances == 5


def test_a_small_deficit_adds_few_instances():
    # (200 - 124) / 8 = 9.5 < 10; 25 * 8 + 124 - 200 = 124 blocks -> 2 instances.
    decision = policy(max_instances=10).decide([load("a", 62, 4), load("b", 62, 4)], now=0.0)
    assert (decision.action, decision.num_instances) == (ScaleAction.UP, 2)


def test_starting_instances_count_toward_the_deficit():
    busy = [load(name, 95, 10) for name in "abc"]
    # With one starting: (300 + 100 - 285) / 30 = 3.8, still low: 25 * 30 + 285 - 400 = 635
    # blocks -> 7 instances, capped at 10 - 3 alive - 1 starting = 6.
    decision = policy(max_instances=10).decide(busy, now=0.0, num_pending=1)
    assert (decision.action, decision.num_instances) == (ScaleAction.UP, 6)


def test_does_nothing_inside_the_band():
    # average (200-100)/10 = 10 is not below 10; without b it would be 0, not above 40.
    assert policy().decide([load("a", 50, 5), load("b", 50, 5)], now=0.0) == NONE


def test_scales_down_the_instance_with_the_fewest_requests():
    loads = [load("a", 10, 1), load("b", 0, 0), load("c", 20, 2)]
    decision = policy().decide(loads, now=0.0)
    assert decision == ScaleDecision(
        ScaleAction.DOWN, "b", "average freeness 90.0, 56.7 without it"
    )


def test_scale_down_counts_waiting_requests_when_choosing():
    loads = [load("a", 10, 1), load("b", 5, 0, waiting=2)]
    assert policy().decide(loads, now=0.0).instance_id == "a"


def test_scale_down_ties_go_to_the_highest_id():
    loads = [load("i09"), load("i10"), load("i08")]
    assert policy().decide(loads, now=0.0).instance_id == "i10"


def test_scale_down_only_if_the_cluster_stays_above_the_band_without_it():
    # average (200-25)/5 = 35 is in the band: no action.
    assert policy().decide([load("a", 25, 5), load("b", 0, 0)], now=0.0) == NONE


def test_never_below_min_instances():
    loads = [load("a"), load("b")]
    assert policy(min_instances=2).decide(loads, now=0.0) == NONE


def test_adds_instances_up_to_min_instances_ignoring_the_cooldown():
    scaler = policy(min_instances=2)
    assert scaler.decide([], now=0.0) == ScaleDecision(ScaleAction.UP, None, "below min_instances")
    assert scaler.decide([], now=1.0, num_pending=1).action is ScaleAction.UP
    assert scaler.decide([], now=2.0, num_pending=2) == NONE


def test_never_above_max_instances():
    loads = [load(name, 95, 10) for name in "abcd"]
    assert policy().decide(loads, now=0.0) == NONE


def test_terminating_instances_count_toward_max_instances():
    loads = [load("a", 95, 10), load("b", 95, 10), load("c", 95, 10), load("t", terminating=True)]
    assert policy().decide(loads, now=0.0) == NONE


def test_cooldown_between_actions():
    scaler = policy()
    busy = [load("a", 90, 10)]
    assert scaler.decide(busy, now=0.0).action is ScaleAction.UP
    assert scaler.decide(busy, now=4.9) == NONE
    assert scaler.decide(busy, now=5.0).action is ScaleAction.UP


def test_no_action_does_not_restart_the_cooldown():
    scaler = policy()
    assert scaler.decide([load("a", 50, 5), load("b", 50, 5)], now=0.0) == NONE
    assert scaler.decide([load("a", 90, 10)], now=0.1).action is ScaleAction.UP


def test_no_second_scale_up_when_the_starting_instance_is_enough():
    # (100 + 100 - 90) / 10 = 11 >= 10 once the starting instance serves.
    assert policy().decide([load("a", 90, 10)], now=0.0, num_pending=1) == NONE


def test_no_scale_down_while_an_instance_is_starting():
    assert policy().decide([load("a"), load("b")], now=0.0, num_pending=1) == NONE


def test_one_drain_at_a_time():
    loads = [load("a"), load("b"), load("t", terminating=True)]
    assert policy().decide(loads, now=0.0) == NONE


def test_scales_up_even_while_draining():
    loads = [load("a", 95, 10), load("t", 10, 1, terminating=True)]
    assert policy().decide(loads, now=0.0) == ScaleDecision(
        ScaleAction.UP, None, "average freeness 0.5", 2
    )


def test_empty_cluster_at_min_one_asks_for_an_instance():
    assert policy().decide([], now=0.0).action is ScaleAction.UP


def test_default_config_values():
    config = ScalingConfig()
    assert (config.interval_s, config.scale_up_freeness, config.scale_down_freeness) == (
        1.0,
        30.0,
        100.0,
    )
    assert (config.cooldown_s, config.min_instances, config.max_instances) == (10.0, 1, 64)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"interval_s": 0}, "interval_s=0"),
        ({"scale_up_freeness": 50, "scale_down_freeness": 40}, "scale_up_freeness=50"),
        ({"cooldown_s": -1}, "cooldown_s=-1"),
        ({"min_instances": 0}, "min_instances=0"),
        ({"min_instances": 5, "max_instances": 4}, "max_instances=4"),
    ],
)
def test_config_validation_names_the_bad_value(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ScalingConfig(**kwargs)


def test_scale_down_victims_come_from_the_removable_instances_only():
    loads = [load("a", 10, 1), load("b", 0, 0), load("c", 20, 2)]
    # b would be chosen, but only a and c can be stopped (e.g. started by the provisioner).
    decision = policy().decide(loads, now=0.0, removable={"a", "c"})
    assert (decision.action, decision.instance_id) == (ScaleAction.DOWN, "a")
    assert policy().decide(loads, now=0.0, removable=set()) == NONE


def test_group_members_are_never_scale_down_victims():
    # b (idle) would be the victim; as a member of g0 (stage 1) it stays, so a goes.
    loads = [
        load("a", 10, 1),
        load("b", 0, 0, group_id="g0", group_stage=1),
        load("c", 20, 2, group_id="g0", group_stage=0),
    ]
    decision = policy().decide(loads, now=0.0)
    assert decision == ScaleDecision(
        ScaleAction.DOWN, "a", "average freeness 90.0, 56.7 without it"
    )
    only_members = [load("b", 0, 0, group_id="g0", group_stage=1), load("c", 20, 2, group_id="g0")]
    assert policy().decide(only_members, now=0.0) == NONE
