import math
from dataclasses import replace

import pytest

from services.common.config import ConfigError
from services.policies import (
    InstanceLoad,
    LoadModelConfig,
    RunningRequest,
    add_pending_dispatches,
    freeness,
    make_instance_load,
    virtual_usage,
)
from tests.unit.policies.snapshots import load


def test_virtual_usage_is_physical_blocks_alone_by_default():
    assert virtual_usage(30, 0, 0, False) == 30.0


def test_virtual_usage_adds_head_of_line_demand_for_defrag():
    assert virtual_usage(30, 12, 0, False) == 42.0


def test_virtual_usage_ignores_head_of_line_demand_without_defrag():
    assert virtual_usage(30, 12, 0, False, LoadModelConfig(enable_defrag=False)) == 30.0


def test_virtual_usage_adds_headroom_per_running_high_priority_request():
    config = LoadModelConfig(high_priority_headroom_blocks=10)
    assert virtual_usage(30, 0, 2, False, config) == 50.0
    assert virtual_usage(30, 5, 0, False, config) == 35.0


def test_virtual_usage_is_infinite_for_a_terminating_instance():
    assert virtual_usage(0, 0, 0, True) == math.inf
    assert (
        virtual_usage(30, 12, 3, True, LoadModelConfig(high_priority_headroom_blocks=10))
        == math.inf
    )


def test_freeness_divides_free_virtual_blocks_by_batch_size():
    assert freeness(100, 40.0, 4) == 15.0


def test_freeness_of_an_idle_instance_is_its_whole_pool():
    assert freeness(100, 0.0, 0) == 100.0


def test_freeness_goes_negative_when_demand_exceeds_the_pool():
    assert freeness(100, 120.0, 5) == -4.0


def test_freeness_of_a_terminating_instance_is_minus_infinity():
    assert freeness(100, math.inf, 3) == -math.inf


def test_make_instance_load_fills_usage_freeness_and_headroom():
    snapshot = make_instance_load(
        "a",
        num_total_blocks=100,
        num_used_blocks=40,
        num_running=4,
        num_waiting=2,
        num_hol_blocks=8,
        num_waiting_blocks=11,
        num_running_high_priority=1,
        running=[("r1", 33, 3, 1)],
        config=LoadModelConfig(high_priority_headroom_blocks=12),
    )
    assert snapshot.virtual_usage == 60.0
    assert snapshot.freeness == 10.0
    assert snapshot.num_headroom_blocks == 12
    assert snapshot.running == (RunningRequest("r1", 33, 3, 1),)
    assert snapshot.running[0].priority == 1


def test_terminating_snapshot_has_no_headroom_and_minus_infinite_freeness():
    snapshot = load("a", used=10, running=1, high=1, headroom=5, terminating=True)
    assert snapshot.virtual_usage == math.inf
    assert snapshot.freeness == -math.inf
    assert snapshot.num_headroom_blocks == 0


def test_instance_load_keeps_its_original_positional_fields():
    snapshot = InstanceLoad("a", 100, 10, 2, 1)
    assert (snapshot.num_hol_blocks, snapshot.num_waiting_blocks, snapshot.num_headroom_blocks) == (
        0,
        0,
        0,
    )
    assert snapshot.is_terminating is False


def test_pending_dispatches_queue_on_the_instance_with_their_prompt_demand():
    before = load("a", used=40, running=4, waiting=1, hol=6)
    after = add_pending_dispatches(before, num_requests=2, num_blocks=10)
    # usage 40 + 6 head of line + 10 pending = 56; freeness (100 - 56) / 4 running
    assert (after.num_waiting, after.num_waiting_blocks, after.virtual_usage, after.freeness) == (
        3,
        16,
        56.0,
        11.0,
    )
    assert (
        replace(after, num_waiting=1, num_waiting_blocks=6, virtual_usage=46.0, freeness=13.5)
        == before
    )


def test_no_pending_dispatch_or_a_terminating_instance_leaves_the_load_as_it_is():
    idle = load("a", used=40, running=4)
    assert add_pending_dispatches(idle, num_requests=0, num_blocks=0) is idle
    draining = load("b", used=40, running=4, terminating=True)
    assert add_pending_dispatches(draining, num_requests=3, num_blocks=30) is draining


def test_load_model_config_rejects_negative_headroom():
    with pytest.raises(ConfigError, match="high_priority_headroom_blocks=-1"):
        LoadModelConfig(high_priority_headroom_blocks=-1)
