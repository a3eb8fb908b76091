"""KunServe group policies on hand-built snapshots: votes over a window, the drop
plan, restore, hysteresis, and the combined `llmesh` policy's choice."""

from __future__ import annotations

import pytest

from services.common.config import ConfigError
from services.policies import GROUP_POLICIES, GroupConfig, GroupDecision, make_group_policy
from services.policies.kunserve import capacity_gain, queued_excess_blocks
from services.policies.presets import PRESETS, preset
from tests.unit.policies.snapshots import load

CONFIG = GroupConfig(vote_window_s=1.0, restore_window_s=2.0, hold_s=5.0, weight_share=0.55)


def policy(name: str = "kunserve", **changes):
    return make_group_policy(name, config=GroupConfig(**{**CONFIG.__dict__, **changes}))


def full(instance_id: str, used: int = 96, waiting_blocks: int = 10, **kw):
    """An instance at >= 95% usage whose queue needs more than its free blocks."""
    return load(instance_id, used, 8, waiting=2, waiting_blocks=waiting_blocks, **kw)


def leader(group_id: str, used: int, *, total: int = 322, waiting: int = 0):
    return load(group_id + "-s0", used, 4, total=total, waiting=waiting, group_id=group_id)


def test_registered_names_and_presets():
    assert sorted(GROUP_POLICIES) == ["kunserve", "llmesh", "none"]
    assert {
        name: (p.dispatch_policy, p.migration_policy, p.group_policy) for name, p in PRESETS.items()
    } == {  # fmt: skip
        "recompute": ("load_balance", "none", "none"),
        "llumnix": ("freest", "freeness", "none"),
        "kunserve": ("load_balance", "none", "kunserve"),
        "llmesh": ("freest", "freeness", "llmesh"),
    }
    with pytest.raises(ConfigError, match="'swap' is unknown"):
        preset("swap")
    with pytest.raises(ConfigError, match="group policy 'x' is unknown"):
        make_group_policy("x")


def test_capacity_gain_matches_the_formula():
    assert round(capacity_gain(2, 0.55), 4) == 1.6111
    assert round(capacity_gain(4, 0.55), 4) == 1.9167
    assert capacity_gain(2, 0.0) == 1.0  # nothing to drop: nothing gained


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"vote_demand_at_least": 0}, "vote_demand_at_least"),
        ({"restore_usage_at_most": 0.96}, "restore_usage_at_most"),
        ({"group_sizes": (4, 2)}, "group_sizes"),
        ({"group_sizes": (1, 2)}, "group_sizes"),
        ({"weight_share": 1.0}, "weight_share"),
        ({"hold_s": -1}, "hold_s"),
        ({"interval_s": 0}, "interval_s"),
    ],
)
def test_bad_config_names_the_field(changes, field):
    with pytest.raises(ConfigError, match=field):
        GroupConfig(**changes)


def test_a_vote_must_hold_for_the_whole_window():
    p = policy()
    loads = [full("a"), full("b")]
    assert p.decide(loads, 0.0) == GroupDecision()
    assert p.decide(loads, 0.9) == GroupDecision()
    decision = p.decide(loads, 1.0)
    assert decision.drops == (("a", "b"),)
    assert decision.restores == ()


def test_a_vote_that_lapses_starts_its_window_again():
    p = policy()
    p.decide([full("a"), full("b")], 0.0)
    # b's queue fits its free blocks at 0.5 s: its vote lapses.
    p.decide([full("a"), full("b", waiting_blocks=3)], 0.5)
    # b holds again from 1.0 s: a alone has voted a whole window, which is no group.
    assert p.decide([full("a"), full("b")], 1.0).drops == ()
    assert p.decide([full("a"), full("b")], 1.9).drops == ()
    assert p.decide([full("a"), full("b")], 2.0).drops == (("a", "b"),)


@pytest.mark.parametrize(
    "instance, votes",
    [
        (full("x"), True),
        # Just preempted: usage 76%, the preempted request queued for 29 blocks (demand
        # 1.05): it votes (a usage rule reset the vote at every preemption).
        (full("x", used=76, waiting_blocks=29), True),
        (full("x", used=76, waiting_blocks=23), False),  # the queue fits the 24 free
        (load("x", 96, 8, waiting=0, waiting_blocks=0), False),  # nothing queued
        (full("x", waiting_blocks=3), False),  # the queue fits the 4 free blocks
        (full("x", waiting_blocks=4), True),  # demand == free blocks counts
        (full("x", terminating=True), False),
        (full("x", group_id="g-1"), False),  # already in a group
    ],
)
def test_who_votes(instance, votes):
    p = policy()
    loads = [instance, full("other")]
    p.decide(loads, 0.0)
    assert p.decide(loads, 1.0).drops == ((("other", "x"),) if votes else ())


def test_a_demand_threshold_above_one_asks_for_a_queue_beyond_memory():
    p = policy(vote_demand_at_least=1.2)
    # Both queue beyond their free blocks; x's demand is (96 + 10) / 100 = 1.06 < 1.2.
    loads = [full("x"), full("other", waiting_blocks=30)]
    p.decide(loads, 0.0)
    assert p.decide(loads, 1.0).drops == ()
    loads = [full("x", waiting_blocks=24), full("other", waiting_blocks=30)]
    p.decide(loads, 1.5)
    assert p.decide(loads, 2.5).drops == (("other", "x"),)


def test_a_voter_with_a_migration_in_flight_waits_for_it_keeping_its_vote():
    p = policy()
    p.decide([full("a"), full("b", migrating=1)], 0.0)
    # b has voted a whole window, but its worker would refuse to join mid-migration.
    assert p.decide([full("a"), full("b", migrating=1)], 1.0).drops == ()
    # The migration is over: the vote still holds, no new window.
    assert p.decide([full("a"), full("b")], 1.1).drops == (("a", "b"),)


def test_one_voter_is_not_a_group():
    p = policy()
    p.decide([full("a"), load("b", 10, 2)], 0.0)
    assert p.decide([full("a"), load("b", 10, 2)], 1.0) == GroupDecision()


def test_the_plan_prefers_queued_demand_then_less_kv_to_exchange():
    p = policy()
    loads = [
        full("a", used=96, waiting_blocks=10),  # excess 6
        full("b", used=95, waiting_blocks=30),  # excess 25
        full("c", used=97, waiting_blocks=9),  # excess 6, more KV in use than a
        full("d", used=96, waiting_blocks=6),  # excess 2
    ]
    p.decide(loads, 0.0)
    decision = p.decide(loads, 1.0)
    # Excess of b + a = 31 blocks; a group of 2 frees (1.611 - 1) x 200 = 122: g = 2.
    # Then c and d form the second group.
    assert decision.drops == (("b", "a"), ("c", "d"))
    assert decision.reasons[0] == "drop g=2: b, a (queued beyond free: 31 blocks)"


def test_the_group_grows_when_two_members_cannot_hold_the_queue():
    p = policy()
    loads = [full(name, waiting_blocks=80) for name in "abcd"]  # excess 76 each
    p.decide(loads, 0.0)
    # g = 2 frees 122 blocks < 152; g = 4 frees (1.917 - 1) x 400 = 366 >= 304.
    assert p.decide(loads, 1.0).drops == (("a", "b", "c", "d"),)
    assert queued_excess_blocks(loads[0]) == 76


def test_the_largest_size_when_none_covers_the_queue_and_only_sizes_there_are_voters_for():
    p = policy()
    loads = [full(name, waiting_blocks=400) for name in "abc"]
    p.decide(loads, 0.0)
    assert p.decide(loads, 1.0).drops == (("a", "b"),)  # 4 would need a fourth voter


def test_restore_needs_hold_low_and_falling_usage_for_the_window_and_an_empty_queue():
    p = policy()
    p.note_formed("g-1", 0.0)
    timeline = [
        (1.0, leader("g-1", 300)),
        (4.0, leader("g-1", 150)),  # <= 50% of 322 from here
        (5.0, leader("g-1", 140)),
        (5.5, leader("g-1", 120, waiting=1)),  # something waits: the low window restarts
        (6.0, leader("g-1", 110)),
        (7.9, leader("g-1", 100)),
    ]
    for now, ld in timeline:
        assert p.decide([ld, load("g-1-s1", 0, 0, group_id="g-1", group_stage=1)], now) == (
            GroupDecision()
        ), now
    decision = p.decide([leader("g-1", 90)], 8.0)
    assert decision.restores == ("g-1",)
    assert decision.reasons == ("restore g-1: usage 0.28 (was 0.34), nothing waiting",)


def test_no_restore_while_usage_is_flat_or_rising():
    p = policy()
    p.note_formed("g-1", 0.0)
    for now in (10.0, 11.0, 12.0, 13.0):
        assert p.decide([leader("g-1", 100)], now).restores == ()  # flat at 31%
    assert p.decide([leader("g-1", 99)], 14.0).restores == ("g-1",)


def test_no_restore_within_hold_s_of_forming():
    p = policy(restore_window_s=0.0)
    p.note_formed("g-1", 10.0)
    assert p.decide([leader("g-1", 0)], 14.9).restores == ()
    assert p.decide([leader("g-1", 0)], 15.0).restores == ("g-1",)


def test_restored_members_do_not_vote_again_within_hold_s():
    p = policy()
    p.note_restored(["a", "b"], 0.0)
    loads = [full("a"), full("b")]
    for now in (1.0, 2.0, 4.9):
        assert p.decide(loads, now).drops == ()
    p.decide(loads, 5.0)  # the window starts once the hold is over
    assert p.decide(loads, 5.9).drops == ()
    assert p.decide(loads, 6.0).drops == (("a", "b"),)


def test_llmesh_drops_once_migration_destinations_cannot_absorb_the_queue():
    p = policy("llmesh", migration_dst_freeness_above=4.0)
    # a and b queue 6 blocks each beyond their free ones: 12 in all.
    assert queued_excess_blocks(full("a")) == queued_excess_blocks(full("b")) == 6
    roomy = load("c", 20, 10)  # freeness 8 > 4, 80 free blocks: migration can take 12
    assert p.decide([full("a"), full("b"), roomy], 0.0).drops == ()
    assert p.decide([full("a"), full("b"), roomy], 2.0).drops == ()  # voted, held back
    busy = load("c", 70, 10)  # freeness 3: not a destination, no room anywhere
    decision = p.decide([full("a"), full("b"), busy], 2.5)
    assert decision.drops == (("a", "b"),)  # the votes held all along: no new window


def test_llmesh_drops_when_the_room_left_is_too_small():
    p = policy("llmesh", migration_dst_freeness_above=4.0)
    exact = load("c", 86, 2)  # freeness 7, 14 free blocks >= 12: held back
    p.decide([full("a"), full("b"), exact], 0.0)
    assert p.decide([full("a"), full("b"), exact], 1.0).drops == ()
    # Same freeness, but its own queue needs 4 of its 14 free blocks: room 10 < 12.
    small = load("c", 86, 2, waiting=1, waiting_blocks=4)
    assert small.freeness == 7.0
    assert p.decide([full("a"), full("b"), small], 1.25).drops == (("a", "b"),)


def test_llmesh_room_adds_up_over_destinations():
    p = policy("llmesh", migration_dst_freeness_above=4.0)
    c, d = load("c", 94, 1), load("d", 94, 1)  # freeness 6, room 6 each: 12 >= 12
    p.decide([full("a"), full("b"), c, d], 0.0)
    assert p.decide([full("a"), full("b"), c, d], 1.0).drops == ()
    d = load("d", 95, 1)  # room 5: 11 < 12
    assert p.decide([full("a"), full("b"), c, d], 1.25).drops == (("a", "b"),)


def test_kunserve_ignores_room_elsewhere():
    p = policy("kunserve")
    roomy = load("c", 20, 10)
    p.decide([full("a"), full("b"), roomy], 0.0)
    assert p.decide([full("a"), full("b"), roomy], 1.0).drops == (("a", "b"),)


def test_none_never_decides_anything():
    p = make_group_policy("none")
    loads = [full("a"), full("b"), leader("g-1", 0)]
    assert p.decide(loads, 0.0) == p.decide(loads, 100.0) == GroupDecision()


def test_llmesh_groups_a_lone_voter_with_one_still_voting_once_no_room_is_left():
    p = policy("llmesh", migration_dst_freeness_above=4.0)
    quiet = load("d", 70, 10)  # freeness 3: no destination, and no vote (nothing queued)
    p.decide([full("a"), load("b", 50, 8), quiet], 0.0)  # a's window starts
    # b's vote starts half a window later (more queued: 16 beyond its free blocks).
    p.decide([full("a"), full("b", waiting_blocks=20), quiet], 0.5)
    # a has voted a whole window, b not yet: llmesh groups them, a (the voter) leading.
    decision = p.decide([full("a"), full("b", waiting_blocks=20), quiet], 1.0)
    assert decision.drops == (("a", "b"),)
    assert decision.reasons[0] == (
        "drop g=2: a, b (no migration room; a voted, the others are voting; "
        "queued beyond free: 22 blocks)"
    )
    # kunserve waits for b's window (its plan ranks b first: more queued).
    k = policy("kunserve")
    k.decide([full("a"), load("b", 50, 8), quiet], 0.0)
    k.decide([full("a"), full("b", waiting_blocks=20), quiet], 0.5)
    assert k.decide([full("a"), full("b", waiting_blocks=20), quiet], 1.0).drops == ()
    assert k.decide([full("a"), full("b", waiting_blocks=20), quiet], 1.5).drops == (("b", "a"),)


def test_llmesh_partners_are_ranked_like_the_plan_and_need_no_migration_in_flight():
    p = policy("llmesh", migration_dst_freeness_above=4.0)
    p.decide([full("a")], 0.0)
    loads = [
        full("a"),
        full("b", waiting_blocks=30, migrating=1),  # voting, but mid-migration
        full("c", waiting_blocks=12),  # 8 beyond free
        full("d", used=97, waiting_blocks=12),  # 9 beyond free: first
    ]
    p.decide(loads, 0.75)  # b, c, d start voting
    assert p.decide(loads, 1.0).drops == (("a", "d"),)


def test_llmesh_leaves_a_lone_voter_alone_while_migration_has_room_or_nobody_else_votes():
    roomy = load("r", 20, 10)  # freeness 8: room for everyone's excess
    p = policy("llmesh", migration_dst_freeness_above=4.0)
    p.decide([full("a"), full("b"), roomy], 0.0)
    p.decide([full("a"), full("b"), roomy], 0.5)
    assert p.decide([full("a"), full("b"), roomy], 1.0).drops == ()  # migrate instead
    q = policy("llmesh", migration_dst_freeness_above=4.0)
    quiet = load("b", 70, 10)  # nearly full but nothing queued: not voting
    q.decide([full("a"), quiet], 0.0)
    assert q.decide([full("a"), quiet], 1.0).drops == ()  # one voter is not a group
