"""services.worker.output_ledger: what a new gateway needs to take a request over."""

from __future__ import annotations

from services.common.messages import FinishReason, OutputDelta
from services.worker.engine import RequestState, SamplingParams
from services.worker.output_ledger import OutputLedger
from tests.clock import FakeClock


def state(request_id: str, output_token_ids=()) -> RequestState:
    return RequestState(
        request_id=request_id,
        prompt_token_ids=(1, 2, 3),
        output_token_ids=tuple(output_token_ids),
        params=SamplingParams(max_tokens=8, seed=5),
        priority=0,
        num_computed_tokens=0,
        arrival_time=0.0,
    )


def test_tokens_are_kept_by_index_from_what_the_request_came_with():
    ledger = OutputLedger(retention_s=10.0, clock=FakeClock())
    ledger.open(state("r", (7, 8)))  # resumed or migrated in with two tokens
    ledger.record([OutputDelta("r", 2, (9,)), OutputDelta("unknown", 0, (1,))])
    ledger.record([OutputDelta("r", 2, (9, 10))])  # overlapping: by index, not appended
    entry = ledger.get("r")
    assert (entry.tokens, entry.is_finished, entry.state.prompt_token_ids) == (
        [7, 8, 9, 10],
        False,
        (1, 2, 3),
    )
    assert ledger.get("unknown") is None


def test_a_finished_request_is_kept_for_the_retention_window_then_released():
    clock = FakeClock(100.0)
    ledger = OutputLedger(retention_s=10.0, clock=clock)
    ledger.open(state("done"))
    ledger.open(state("later"))
    ledger.record([OutputDelta("done", 0, (4, 5), FinishReason.LENGTH)])
    clock.now = 105.0
    ledger.record([OutputDelta("later", 0, (6,), FinishReason.STOP)])
    ledger.discard("done")  # the worker lets a finished request go: its tokens stay
    entry = ledger.get("done")
    assert (entry.tokens, entry.finish_reason) == ([4, 5], FinishReason.LENGTH)
    ledger.record([OutputDelta("done", 2, (99,))])  # nothing after the finish
    assert ledger.get("done").tokens == [4, 5]
    clock.now = 110.0
    assert ledger.get("done") is None
    assert ledger.get("later").finish_reason is FinishReason.STOP
    clock.now = 115.0
    assert (ledger.get("later"), len(ledger)) == (None, 0)


def test_aborted_failed_and_departed_requests_are_not_kept():
    ledger = OutputLedger(retention_s=10.0, clock=FakeClock())
    for request_id in ("aborted", "failed", "migrated"):
        ledger.open(state(request_id))
    ledger.record(
        [
            OutputDelta("aborted", 0, (1,), FinishReason.ABORT),
            OutputDelta("failed", 0, (), FinishReason.ERROR, "worker shutting down"),
            OutputDelta("migrated", 0, (3,)),
        ]
    )
    ledger.discard("migrated")  # another worker runs it now
    assert [ledger.get(r) for r in ("aborted", "failed", "migrated")] == [None, None, None]
    assert len(ledger) == 0


def test_a_request_that_comes_back_starts_a_fresh_entry():
    clock = FakeClock()
    ledger = OutputLedger(retention_s=10.0, clock=clock)
    ledger.open(state("r"))
    ledger.record([OutputDelta("r", 0, (1,), FinishReason.LENGTH)])
    ledger.open(state("r", (1,)))  # e.g. migrated back in, unfinished
    clock.now = 20.0  # the old finish must not expire the new entry
    entry = ledger.get("r")
    assert (entry.tokens, entry.is_finished) == ([1], False)


def test_a_duplicate_of_a_running_request_keeps_its_entry():
    ledger = OutputLedger(retention_s=10.0, clock=FakeClock())
    ledger.open(state("r"))
    ledger.record([OutputDelta("r", 0, (1, 2))])
    ledger.open(state("r"))  # a second Submit of the same id (the engine refuses it)
    assert ledger.get("r").tokens == [1, 2]
