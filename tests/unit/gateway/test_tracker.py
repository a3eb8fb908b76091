"""gateway.tracker: de-duplication by token index, finish and loss bookkeeping."""

from __future__ import annotations

import asyncio

from gateway.tracker import PlacementStatus, RequestTracker
from services.common.messages import FinishReason, OutputDelta


def delta(first, tokens, reason=FinishReason.NONE, error=""):
    return OutputDelta("r", first, tuple(tokens), reason, error)


def test_duplicates_are_dropped_and_gaps_wait_for_the_missing_index():
    tracker = RequestTracker("r")
    tracker.mark_placed("a")
    tracker.on_output(delta(0, [10, 11]), "a")
    tracker.on_output(delta(1, [11, 12]), "b")  # a resumed copy repeats index 1
    tracker.on_output(delta(5, [15]), "b")  # early: index 3 and 4 are missing
    assert tracker.tokens == [10, 11, 12]
    tracker.on_output(delta(3, [13, 14]), "b")
    assert tracker.tokens == [10, 11, 12, 13, 14, 15]
    assert tracker.num_duplicates == 1


def test_finish_waits_until_every_token_before_it_arrived():
    tracker = RequestTracker("r")
    tracker.mark_placed("a")
    tracker.on_output(delta(2, [12], FinishReason.LENGTH), "a")
    assert not tracker.is_finished
    tracker.on_output(delta(0, [10, 11]), "a")
    assert tracker.is_finished
    assert (tracker.tokens, tracker.finish_reason, tracker.status) == (
        [10, 11, 12],
        FinishReason.LENGTH,
        PlacementStatus.DONE,
    )


def test_error_from_the_current_instance_marks_it_lost_but_not_from_an_old_one():
    tracker = RequestTracker("r")
    tracker.mark_placed("a")
    tracker.on_output(delta(0, [10]), "a")
    tracker.on_output(delta(1, [], FinishReason.ERROR, "boom"), "old")
    assert tracker.status is PlacementStatus.PLACED
    tracker.on_output(delta(1, [], FinishReason.ERROR, "boom"), "a")
    assert tracker.status is PlacementStatus.LOST
    assert tracker.needs_placement
    assert "boom" in tracker.lost_reason


def test_instance_loss_only_concerns_requests_on_it():
    tracker = RequestTracker("r")
    tracker.mark_placed("a")
    assert tracker.mark_lost("b", "gone") is False
    assert tracker.mark_lost("a", "gone") is True
    assert tracker.mark_lost("a", "gone again") is False
    tracker.mark_unplaced()
    assert tracker.status is PlacementStatus.UNPLACED


def test_abort_finishes_at_what_was_received():
    tracker = RequestTracker("r")
    tracker.mark_placed("a")
    tracker.on_output(delta(0, [10, 11]), "a")
    tracker.finish_aborted()
    tracker.on_output(delta(2, [12]), "a")  # late tokens after the abort are ignored
    assert (tracker.tokens, tracker.finish_reason, tracker.is_finished) == (
        [10, 11],
        FinishReason.ABORT,
        True,
    )


async def test_wait_changed_wakes_on_output():
    tracker = RequestTracker("r")
    waiter = asyncio.create_task(tracker.wait_changed())
    await asyncio.sleep(0)
    assert not waiter.done()
    tracker.on_output(delta(0, [1]), "a")
    await asyncio.wait_for(waiter, 1.0)


def test_a_stop_string_finishes_as_stop_at_its_token():
    # The HTTP API found a stop string completed by token 1 of the 3 received: the
    # request finishes as "stop" there (what its metrics and spans report), not "abort".
    tracker = RequestTracker("r")
    tracker.mark_placed("a")
    tracker.on_output(delta(0, [10, 11, 12]), "a")
    tracker.finish_aborted(FinishReason.STOP, num_tokens=2)
    assert (tracker.finish_reason, tracker.is_finished) == (FinishReason.STOP, True)
    assert tracker.tokens[:2] == [10, 11]
