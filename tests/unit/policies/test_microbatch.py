"""Pipeline timing and bubble fraction (services/policies/microbatch.py) on schedules
small enough to draw by hand."""

from __future__ import annotations

import pytest

from services.policies.microbatch import PipelineClock, bubble_fraction, simulate_pipeline


def test_equal_micro_batches_fill_the_pipeline_but_for_its_ends():
    # g = 2, 2 in flight, 2 s per stage. Micro-batch 2 waits for 0 to come back (4).
    #   stage 0  [0 ][1 ][2 ][3 ]
    #   stage 1      [0 ][1 ][2 ][3 ]     makespan 10, busy 16 of 20
    clock = simulate_pipeline([2.0] * 4, num_stages=2)
    assert clock.starts == [[0, 2], [2, 4], [4, 6], [6, 8]]
    assert clock.finishes == [[2, 4], [4, 6], [6, 8], [8, 10]]
    assert (clock.busy_s, clock.makespan_s) == (16.0, 10.0)
    assert clock.bubble_fraction == pytest.approx(0.2)


def test_unequal_micro_batches_leave_bubbles():
    # g = 2, 2 in flight, costs 3, 1, 3, 1 on every stage:
    #   stage 0  [0  ][1]  .  [2  ][3]             2 waits for 0's return at 6
    #   stage 1       [0  ][1]  . [2  ][3]          3 waits for stage 1 (12)
    clock = simulate_pipeline([3, 1, 3, 1], num_stages=2)
    assert clock.starts == [[0, 3], [3, 6], [6, 9], [9, 12]]
    assert clock.finishes == [[3, 6], [4, 7], [9, 12], [10, 13]]
    assert clock.bubble_fraction == pytest.approx(1 - 16 / 26)
    # The same work balanced: 2, 2, 2, 2 (0.2, above).
    assert bubble_fraction([2, 2, 2, 2], 2) == pytest.approx(0.2)


def test_per_stage_costs_in_flight_bound_and_transfers():
    # Per-stage costs (1 on stage 0, 2 on stage 1): stage 1 is the bottleneck.
    clock = simulate_pipeline([(1, 2), (1, 2)], num_stages=2)
    assert clock.finishes == [[1, 3], [2, 5]]
    assert clock.bubble_fraction == pytest.approx(1 - 6 / 10)
    # One in flight: nothing overlaps.
    clock = simulate_pipeline([1, 1], num_stages=2, max_in_flight=1)
    assert clock.starts == [[0, 1], [2, 3]]
    assert clock.bubble_fraction == pytest.approx(0.5)
    # A 1 s hop each way: stage 1 starts at 2; the result is back at 4.
    clock = PipelineClock(2, transfer_s=1.0)
    assert clock.add(1.0) == 4.0
    assert clock.starts == [[0, 2]]
    assert clock.bubble_fraction == pytest.approx(1 - 2 / 6)
    # not_before: the simulator adds a micro-batch when stage 0 can form it.
    assert clock.next_start() == 1.0
    clock.add(1.0, not_before=5.0)
    assert clock.starts[-1] == [5.0, 7.0]


def test_degenerate_runs():
    assert bubble_fraction([], 4) == 0.0
    assert bubble_fraction([1.0, 1.0, 1.0], 1) == 0.0  # one stage never waits
    assert bubble_fraction([1.0], 4) == pytest.approx(0.75)  # one micro-batch, 4 stages
    with pytest.raises(ValueError, match="3 stage costs for 2 stages"):
        bubble_fraction([(1, 1, 1)], 2)
    with pytest.raises(ValueError, match="num_stages=0 must be >= 1"):
        PipelineClock(0)
    live = PipelineClock(2, is_recording=False)
    live.add(2.0)
    assert (live.starts, live.makespan_s, live.num_micro_batches) == ([], 4.0, 1)
