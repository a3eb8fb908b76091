import math

import pytest

from services.common.config import ConfigError
from services.policies import (
    MIGRATION_POLICIES,
    MigrationConfig,
    MigrationPair,
    make_migration_policy,
)
from tests.unit.policies.snapshots import load

CONFIG = MigrationConfig(
    src_freeness_below=5.0, dst_freeness_above=20.0, max_migrations_per_instance=1
)


def pair(loads, config=CONFIG):
    return make_migration_policy("freeness", config=config).pair(loads)


def test_registered_migration_names():
    assert sorted(MIGRATION_POLICIES) == ["freeness", "none"]


def test_pairs_the_least_free_source_with_the_freest_destination():
    # freeness: a = 2, b = 4, c = 45, d = 30, e = 10 (neither)
    loads = [
        load("a", 80, 10),
        load("b", 60, 10),
        load("c", 10, 2),
        load("d", 40, 2),
        load("e", 50, 5),
    ]
    assert pair(loads) == [MigrationPair("a", "c", 1), MigrationPair("b", "d", 1)]


def test_extra_sources_wait_for_a_later_round():
    loads = [load("a", 80, 10), load("b", 60, 10), load("c", 10, 2)]
    assert pair(loads) == [MigrationPair("a", "c", 1)]


def test_extra_destinations_stay_idle():
    loads = [load("a", 80, 10), load("c", 10, 2), load("d", 40, 2)]
    assert pair(loads) == [MigrationPair("a", "c", 1)]


def test_ties_are_broken_by_instance_id_on_both_sides():
    loads = [load("b", 80, 10), load("a", 80, 10), load("d", 10, 2), load("c", 10, 2)]
    assert pair(loads) == [MigrationPair("a", "c", 1), MigrationPair("b", "d", 1)]


def test_head_of_line_demand_makes_a_source_for_defragmentation():
    # b has room physically ((100-30)/5 = 14) but its queued 70-block prompt makes it 0.
    loads = [load("a", 10, 2), load("b", 30, 5, waiting=1, hol=70)]
    assert pair(loads) == [MigrationPair("b", "a", 1)]


def test_without_defrag_the_same_instance_is_not_a_source():
    loads = [load("a", 10, 2, defrag=False), load("b", 30, 5, waiting=1, hol=70, defrag=False)]
    assert pair(loads) == []


def test_high_priority_headroom_makes_a_source_while_another_instance_has_room():
    # a: 2 high-priority requests of 10 running, 16 blocks of headroom:
    # (100-50-16)/10 = 3.4 < 5, a source; without headroom (100-50)/10 = 5.0 is not.
    # b: (100-20)/2 = 40 > 20 takes the normal request a sends (selection's job).
    b = load("b", 20, 2)
    assert pair([load("a", 50, 10, high=2, headroom=8), b]) == [MigrationPair("a", "b", 1)]
    assert pair([load("a", 50, 10, high=2), b]) == []
    # The whole cluster loaded: no destination, the headroom turns no work away.
    assert pair([load("a", 50, 10, high=2, headroom=8), load("b", 80, 10)]) == []


def test_terminating_instance_is_drained_with_the_drain_batch_size():
    config = MigrationConfig(
        src_freeness_below=5.0, dst_freeness_above=20.0, num_drain_requests_per_pair=3
    )
    loads = [load("a", 10, 1, terminating=True), load("b", 10, 2), load("c", 80, 10)]
    assert pair(loads, config) == [MigrationPair("a", "b", 3)]


def test_terminating_instance_drains_before_overloaded_ones():
    loads = [load("a", 95, 10), load("t", 10, 1, terminating=True), load("c", 10, 2)]
    assert pair(loads)[0] == MigrationPair("t", "c", 4)


def test_terminating_instance_is_never_a_destination():
    loads = [load("a", 90, 10), load("t", 0, 0, terminating=True)]
    assert pair(loads) == []


def test_empty_source_has_nothing_to_migrate():
    # a's freeness is 0 from a queued prompt alone, but it runs nothing.
    loads = [load("a", 0, 0, waiting=1, hol=100), load("b", 0, 1)]
    assert pair(loads) == []
    loads = [load("t", 0, 0, terminating=True), load("b", 0, 1)]
    assert pair(loads) == []


def test_instances_without_a_free_migration_slot_are_skipped():
    loads = [load("a", 80, 10, migrating=1), load("b", 70, 10), load("c", 10, 2, migrating=1)]
    loads.append(load("d", 20, 2))
    assert pair(loads) == [MigrationPair("b", "d", 1)]


def test_more_slots_allow_concurrent_migrations():
    config = MigrationConfig(
        src_freeness_below=5.0, dst_freeness_above=20.0, max_migrations_per_instance=2
    )
    loads = [load("a", 80, 10, migrating=1), load("c", 10, 2, migrating=1)]
    assert pair(loads, config) == [MigrationPair("a", "c", 1)]


def test_all_busy_cluster_has_no_destination():
    loads = [load(name, 90, 10) for name in "abcd"]
    assert pair(loads) == []


def test_balanced_cluster_migrates_nothing():
    loads = [load(name, 50, 5) for name in "abcd"]
    assert pair(loads) == []


def test_empty_cluster_migrates_nothing():
    assert pair([]) == []


def test_thresholds_are_strict():
    # freeness exactly 5 is not a source, exactly 20 is not a destination.
    loads = [load("a", 50, 10), load("b", 60, 2)]
    assert pair(loads) == []


def test_requests_per_pair_comes_from_the_config():
    config = MigrationConfig(
        src_freeness_below=5.0, dst_freeness_above=20.0, num_requests_per_pair=2
    )
    assert pair([load("a", 80, 10), load("c", 10, 2)], config) == [MigrationPair("a", "c", 2)]


def test_none_policy_never_migrates():
    loads = [load("a", 80, 10), load("c", 10, 2)]
    assert make_migration_policy("none").pair(loads) == []


def test_default_config_values():
    config = MigrationConfig()
    assert (config.interval_s, config.src_freeness_below, config.dst_freeness_above) == (
        0.05,
        2.0,
        4.0,
    )
    assert (
        config.num_requests_per_pair,
        config.num_drain_requests_per_pair,
        config.max_migrations_per_instance,
    ) == (1, 4, 2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"interval_s": 0}, "interval_s=0"),
        ({"src_freeness_below": 10, "dst_freeness_above": 5}, "dst_freeness_above=5"),
        ({"src_freeness_below": math.nan}, "must be numbers"),
        ({"num_requests_per_pair": 0}, "num_requests_per_pair=0"),
        ({"num_drain_requests_per_pair": 0}, "num_drain_requests_per_pair=0"),
        ({"max_migrations_per_instance": 0}, "max_migrations_per_instance=0"),
    ],
)
def test_config_validation_names_the_bad_value(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        MigrationConfig(**kwargs)


def test_group_members_are_never_sources_or_destinations():
    # Alone, a (freeness 2) would migrate to b (45) or c (45); as members of g0 (either
    # stage) neither end is paired, so the overloaded d goes to the free e only.
    loads = [
        load("a", 80, 10, group_id="g0", group_stage=0),
        load("b", 10, 2, group_id="g0", group_stage=1),
        load("d", 85, 10),
        load("e", 10, 2),
    ]
    assert pair(loads) == [MigrationPair("d", "e", 1)]
    members = [
        load("a", 98, 10, group_id="g0", group_stage=0),
        load("b", 0, 0, group_id="g0", group_stage=1),
        load("c", 0, 0),
    ]
    assert pair(members) == []
