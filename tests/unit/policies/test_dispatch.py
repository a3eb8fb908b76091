import pytest

from services.common.config import ConfigError
from services.policies import DISPATCH_POLICIES, DispatchInfo, make_dispatch_policy
from tests.unit.policies.snapshots import load

NORMAL = DispatchInfo("req", num_prompt_tokens=32)
HIGH = DispatchInfo("req-high", num_prompt_tokens=32, priority=1)


def test_registered_dispatch_names():
    assert sorted(DISPATCH_POLICIES) == ["freest", "load_balance", "round_robin"]


def test_unknown_dispatch_name_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"'nope' is unknown; choose from \['freest'"):
        make_dispatch_policy("nope")


# ---- freest -----------------------------------------------------------------------


def test_freest_picks_the_highest_freeness_with_the_request():
    # The 32-token prompt needs 2 blocks: a = (100-60-2)/5 = 7.6, b = (100-50-2)/3 = 16,
    # c = (100-10-2)/11 = 8.
    loads = [load("a", 60, 4), load("b", 50, 2), load("c", 10, 10)]
    assert make_dispatch_policy("freest").choose(loads, NORMAL) == "b"


def test_freest_counts_head_of_line_demand():
    # b has fewer used blocks but a queued 80-block prompt: (100-20-80-2)/4 < a's 7.6
    loads = [load("a", 60, 4), load("b", 20, 2, waiting=1, hol=80)]
    assert make_dispatch_policy("freest").choose(loads, NORMAL) == "a"


def test_freest_counts_the_whole_queue_so_a_burst_spreads():
    # a's head of line is small, but 3 requests wait: (100-10-6-2)/5 = 16.4 < b's 22.7
    loads = [load("a", 10, 1, waiting=3, hol=2, waiting_blocks=6), load("b", 30, 2)]
    assert make_dispatch_policy("freest").choose(loads, NORMAL) == "b"


def test_freest_counts_the_request_itself():
    # Without the request a (freeness 40) beats b (30); a 1000-token prompt (63 blocks)
    # fits b better: a = (100-60-63)/2 < 0, b = (200-140-63)/3 < 0 but higher.
    big = DispatchInfo("big", num_prompt_tokens=1000)
    loads = [load("a", 60, 1), load("b", 140, 2, total=200)]
    assert make_dispatch_policy("freest").choose(loads, big) == "b"


def test_freest_breaks_ties_toward_the_lowest_id():
    loads = [load("c", 50, 5), load("a", 50, 5), load("b", 50, 5)]
    assert make_dispatch_policy("freest").choose(loads, NORMAL) == "a"


def test_freest_tie_break_handles_ids_that_prefix_each_other():
    loads = [load("ab", 50, 5), load("a", 50, 5)]
    assert make_dispatch_policy("freest").choose(loads, NORMAL) == "a"


def test_freest_skips_terminating_instances():
    loads = [load("a", 90, 9), load("b", 0, 0, terminating=True)]
    assert make_dispatch_policy("freest").choose(loads, NORMAL) == "a"


def test_freest_returns_none_for_an_empty_cluster():
    assert make_dispatch_policy("freest").choose([], NORMAL) is None


def test_freest_returns_none_when_every_instance_is_terminating():
    loads = [load("a", terminating=True), load("b", terminating=True)]
    assert make_dispatch_policy("freest").choose(loads, NORMAL) is None


def test_freest_still_dispatches_when_every_instance_is_overloaded():
    # All busy: a = (100-100-30-2)/14 = -2.3, b = (100-100-40-2)/10 = -4.2; least bad wins.
    loads = [load("a", 100, 10, waiting=3, hol=30), load("b", 100, 8, waiting=1, hol=40)]
    assert make_dispatch_policy("freest").choose(loads, NORMAL) == "a"


def test_freest_honours_exclusions():
    loads = [load("a", 10, 1), load("b", 50, 5)]
    info = DispatchInfo("r", 8, exclude_instance_ids=("a",))
    assert make_dispatch_policy("freest").choose(loads, info) == "b"


def test_freest_does_not_turn_normal_requests_away_from_high_priority_headroom():
    # a runs a high-priority request with 40 blocks of headroom: its virtual usage is 60
    # (freeness 20), but dispatch ranks physical demand: a = (100-20-2)/3 = 26,
    # b = (100-50-2)/3 = 16. Both classes go to a.
    loads = [load("a", 20, 2, high=1, headroom=40), load("b", 50, 2, headroom=40)]
    assert (loads[0].virtual_usage, loads[0].freeness) == (60.0, 20.0)
    policy = make_dispatch_policy("freest")
    assert policy.choose(loads, NORMAL) == policy.choose(loads, HIGH) == "a"


def test_freest_without_headroom_ranks_high_priority_like_normal():
    loads = [load("a", 20, 2, high=1), load("b", 50, 2)]
    policy = make_dispatch_policy("freest")
    assert policy.choose(loads, HIGH) == policy.choose(loads, NORMAL) == "a"


# ---- round_robin --------------------------------------------------------------------


def test_round_robin_cycles_in_id_order_whatever_the_load():
    loads = [load("b", 99, 9), load("a", 0, 0), load("c", 50, 1)]
    policy = make_dispatch_policy("round_robin")
    assert [policy.choose(loads, NORMAL) for _ in range(5)] == ["a", "b", "c", "a", "b"]


def test_round_robin_skips_terminating_instances():
    loads = [load("a"), load("b", terminating=True), load("c")]
    policy = make_dispatch_policy("round_robin")
    assert [policy.choose(loads, NORMAL) for _ in range(3)] == ["a", "c", "a"]


def test_round_robin_returns_none_for_an_empty_cluster():
    assert make_dispatch_policy("round_robin").choose([], NORMAL) is None


def test_round_robin_instances_keep_separate_counters():
    loads = [load("a"), load("b")]
    first, second = make_dispatch_policy("round_robin"), make_dispatch_policy("round_robin")
    assert first.choose(loads, NORMAL) == "a"
    assert first.choose(loads, NORMAL) == "b"
    assert second.choose(loads, NORMAL) == "a"


# ---- load_balance -------------------------------------------------------------------


def test_load_balance_picks_the_lowest_physical_demand_ratio():
    # demand: a = (60+0)/100, b = (30+40)/100, c = (50+0)/100
    loads = [load("a", 60, 3), load("b", 30, 1, waiting=2, waiting_blocks=40), load("c", 50, 9)]
    assert make_dispatch_policy("load_balance").choose(loads, NORMAL) == "c"


def test_load_balance_ignores_batch_size_and_head_of_line_weighting():
    # freest would pick b ((100-40)/1 = 60 vs a's (100-30)/10 = 7); load_balance sees 30 < 40.
    loads = [load("a", 30, 10), load("b", 40, 1)]
    assert make_dispatch_policy("load_balance").choose(loads, NORMAL) == "a"
    assert make_dispatch_policy("freest").choose(loads, NORMAL) == "b"


def test_load_balance_ignores_high_priority_headroom():
    loads = [load("a", 20, 2, high=2, headroom=40), load("b", 30, 2)]
    assert make_dispatch_policy("load_balance").choose(loads, NORMAL) == "a"


def test_load_balance_compares_ratios_across_pool_sizes():
    loads = [load("a", 50, 1, total=100), load("b", 80, 1, total=200)]
    assert make_dispatch_policy("load_balance").choose(loads, NORMAL) == "b"


def test_load_balance_ties_go_to_fewer_requests_then_lowest_id():
    loads = [load("c", 50, 2), load("b", 50, 1, waiting=1), load("a", 50, 3)]
    assert make_dispatch_policy("load_balance").choose(loads, NORMAL) == "b"
    loads = [load("c", 50, 2), load("b", 50, 2)]
    assert make_dispatch_policy("load_balance").choose(loads, NORMAL) == "b"


def test_load_balance_skips_terminating_and_handles_an_empty_cluster():
    policy = make_dispatch_policy("load_balance")
    assert policy.choose([load("a", 0, 0, terminating=True), load("b", 90, 9)], NORMAL) == "b"
    assert policy.choose([load("a", terminating=True)], NORMAL) is None
    assert policy.choose([], NORMAL) is None


# ---- KunServe groups ----------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(DISPATCH_POLICIES))
def test_every_policy_skips_group_followers_but_takes_stage_0(name):
    # g0's stage 0 reports the group's load; its followers report an idle pool. Only the
    # followers are skipped, so the group takes requests through stage 0 alone.
    loads = [
        load("a", 90, 9, group_id="g0", group_stage=0),
        load("b", 0, 0, group_id="g0", group_stage=1),
        load("c", 0, 0, group_id="g0", group_stage=2),
    ]
    policy = make_dispatch_policy(name)
    assert [policy.choose(loads, NORMAL) for _ in range(3)] == ["a", "a", "a"]


def test_freest_weighs_a_group_stage_0_against_instances_alone():
    # Stage 0 of g0 (2 members, weight share 0.55: its 400-block pool is what
    # int(400 / 1.6111) = 248 blocks held alone): (248-100-2)/5 = 29.2; d alone:
    # (100-50-2)/3 = 16; e (follower of g0, idle) would be the freest but takes nothing.
    loads = [
        load("a", 100, 4, total=400, group_id="g0", group_stage=0),
        load("d", 50, 2),
        load("e", 0, 0, total=400, group_id="g0", group_stage=1),
    ]
    policy = make_dispatch_policy("freest")
    assert policy.choose(loads, NORMAL) == "a"
    assert policy.choose(loads, DispatchInfo("r", 32, exclude_instance_ids=("a",))) == "d"
    assert policy.choose(loads, DispatchInfo("r", 32, exclude_instance_ids=("a", "d"))) is None


def test_freest_counts_a_group_at_its_members_own_capacity():
    # g0's pool: 400 blocks, 200 used. By its pool it is the freest, (400-200-2)/5 = 39.6,
    # but its two members held int(400 / 1.6111) = 248 blocks alone: (248-200-2)/5 = 9.2,
    # below d's (100-50-2)/3 = 16. The drop's memory is for the group's own overload.
    group = [
        load("a", 200, 4, total=400, group_id="g0", group_stage=0),
        load("e", 0, 0, total=400, group_id="g0", group_stage=1),
    ]
    policy = make_dispatch_policy("freest", group_weight_share=0.55)
    assert policy.own_blocks(group[0], {"g0": 2}) == 248
    assert policy.choose([*group, load("d", 50, 2)], NORMAL) == "d"
    # Once d is fuller than that ((100-90-2)/3 = 2.7), the group takes the request.
    assert policy.choose([*group, load("d", 90, 2)], NORMAL) == "a"
    # With nothing to drop (weight share 0) a group holds no more than its members did.
    flat = make_dispatch_policy("freest", group_weight_share=0.0)
    assert flat.own_blocks(group[0], {"g0": 2}) == 400
    assert flat.choose([*group, load("d", 50, 2)], NORMAL) == "a"


def test_freest_group_size_comes_from_the_followers_in_the_snapshot():
    policy = make_dispatch_policy("freest", group_weight_share=0.55)
    stage0 = load("a", 200, 4, total=800, group_id="g0", group_stage=0)
    followers = [load(f"f{i}", 0, 0, total=800, group_id="g0", group_stage=i) for i in (1, 2, 3)]
    # Four members: gain (4 - 0.55) / (4 x 0.45) = 1.9167, int(800 / 1.9167) = 417.
    assert policy.own_blocks(stage0, {"g0": 4}) == 417
    # (417-200-2)/5 = 43 < d's (500-50-2)/3 = 149.3 ...
    assert policy.choose([stage0, *followers, load("d", 50, 2, total=500)], NORMAL) == "d"
    # ... but without its followers in the snapshot (a view that lacks them) the group
    # counts at its pool: (800-200-2)/5 = 119.6 < 149.3, and beats d at 60 free blocks.
    assert policy.own_blocks(stage0, {"g0": 1}) == 800
    assert policy.choose([stage0, load("d", 440, 2, total=500)], NORMAL) == "a"


def test_freest_rejects_a_weight_share_outside_0_1():
    with pytest.raises(ConfigError, match=r"group_weight_share=1.0 must be in \[0, 1\)"):
        make_dispatch_policy("freest", group_weight_share=1.0)
