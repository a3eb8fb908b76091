import pytest

from services.policies import SELECTION_POLICIES, RunningRequest, make_selection_policy

# (request_id, num_tokens, num_blocks, priority)
RUNNING = [
    ("r-long", 300, 19, 0),
    ("r-high", 20, 2, 1),
    ("r-mid", 100, 7, 0),
    ("r-short", 40, 3, 0),
]


def test_registered_selection_names():
    assert sorted(SELECTION_POLICIES) == [
        "longest_first",
        "lowest_priority_first",
        "shortest_first",
    ]


def test_shortest_first_orders_by_tokens():
    policy = make_selection_policy("shortest_first")
    assert policy.select(RUNNING, 3) == ["r-high", "r-short", "r-mid"]


def test_lowest_priority_first_keeps_high_priority_requests_last():
    policy = make_selection_policy("lowest_priority_first")
    assert policy.select(RUNNING, 4) == ["r-short", "r-mid", "r-long", "r-high"]


def test_longest_first_orders_by_tokens_descending():
    policy = make_selection_policy("longest_first")
    assert policy.select(RUNNING, 2) == ["r-long", "r-mid"]


def test_ties_go_to_the_lowest_request_id():
    running = [("b", 10, 1, 0), ("c", 10, 1, 0), ("a", 10, 1, 0)]
    for name in SELECTION_POLICIES:
        assert make_selection_policy(name).select(running, 2) == ["a", "b"]


def test_max_blocks_skips_requests_that_do_not_fit_and_spends_the_budget():
    policy = make_selection_policy("longest_first")
    # r-long (19) does not fit in 10; r-mid (7) does, leaving 3: r-short (3) fits, r-high no.
    assert policy.select(RUNNING, 4, max_blocks=10) == ["r-mid", "r-short"]


def test_zero_requests_or_no_candidates_select_nothing():
    policy = make_selection_policy("shortest_first")
    assert policy.select(RUNNING, 0) == []
    assert policy.select([], 3) == []


def test_asking_for_more_than_exist_returns_them_all():
    policy = make_selection_policy("shortest_first")
    assert policy.select(RUNNING[:2], 5) == ["r-high", "r-long"]


def test_accepts_running_request_tuples():
    policy = make_selection_policy("shortest_first")
    assert policy.select([RunningRequest("x", 5, 1), RunningRequest("y", 4, 1)], 1) == ["y"]


def test_negative_count_is_rejected():
    with pytest.raises(ValueError, match="num_requests=-1"):
        make_selection_policy("shortest_first").select(RUNNING, -1)
