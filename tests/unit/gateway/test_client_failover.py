"""gateway.client_failover: which gateway a dead stream goes on at, from which token;
gateway.client_resubmit: a request found nowhere sent again, its delivered prefix skipped."""

from __future__ import annotations

import grpc
import pytest

from gateway.client import Chunk, build_request
from gateway.client_failover import (
    FAILOVER_RETRY_S,
    FailoverState,
    generate_opener,
    with_request_id,
)
from gateway.client_resubmit import PrefixMismatch, Resubmission
from tests.unit.gateway.test_dispatcher import FakeRpcError

UNAVAILABLE = FakeRpcError(grpc.StatusCode.UNAVAILABLE)


class Stub:
    def __init__(self, name: str) -> None:
        self.name = name
        self.calls = []

    def Resume(self, request, timeout):
        self.calls.append((request.request_id, request.next_index, request.detokenize, timeout))
        return self.name


def chunk(first: int, tokens: tuple[int, ...], seed=None) -> Chunk:
    return Chunk("r", first, tokens, "", None, "worker-0", seed)


def test_the_stream_goes_on_at_the_next_gateway_from_the_tokens_yielded():
    a, b, c = Stub("a"), Stub("b"), Stub("c")
    state = FailoverState([a, b, c], "r", 0, detokenize=True)
    assert state.on_chunk(chunk(0, (5, 6), seed=9)).seed == 9
    assert state.on_chunk(chunk(2, (7,))).token_ids == (7,)
    assert state.retry_wait_s(UNAVAILABLE) == 0.0  # at once
    assert state.next_call(30.0) == "b"
    assert b.calls == [("r", 3, True, 30.0)]
    # b is down too: c, then (a full round later) a again, after a backoff.
    assert (state.retry_wait_s(UNAVAILABLE), state.next_call(1.0)) == (FAILOVER_RETRY_S, "c")
    assert (state.retry_wait_s(UNAVAILABLE), state.next_call(1.0)) == (2 * FAILOVER_RETRY_S, "a")
    # The resumed stream's first chunk repeats the seed: the caller sees it once.
    assert state.on_chunk(chunk(3, (8,), seed=9)).seed is None
    assert (state.failures, state.next_index) == (0, 4)


def test_other_errors_no_list_or_no_request_id_are_not_failed_over():
    assert FailoverState([Stub("a")], "r", 0, False).retry_wait_s(UNAVAILABLE) is None
    assert FailoverState([Stub("a"), Stub("b")], "", 0, False).retry_wait_s(UNAVAILABLE) is None
    invalid = FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT)
    assert FailoverState([Stub("a"), Stub("b")], "r", 0, False).retry_wait_s(invalid) is None


def test_it_gives_up_after_some_rounds_and_reports_the_original_failure():
    state = FailoverState([Stub("a"), Stub("b")], "r", 0, False)
    waits = []
    while (wait_s := state.retry_wait_s(UNAVAILABLE)) is not None:
        waits.append(wait_s)
    assert len(waits) == 8  # 4 rounds over 2 gateways
    assert waits[-1] == 8 * FAILOVER_RETRY_S  # the backoff stops doubling
    # Nowhere to be found after the gateway died: the caller sees why the stream failed.
    not_found = FakeRpcError(grpc.StatusCode.NOT_FOUND)
    assert state.error_for(not_found) is UNAVAILABLE
    assert FailoverState([], "r", 0, False).error_for(not_found) is not_found


def test_with_failover_the_client_chooses_the_request_id():
    chosen = with_request_id({"max_tokens": 4}, failover=True)["request_id"]
    assert len(chosen) == 32 and chosen != with_request_id({}, True)["request_id"]
    assert with_request_id({"request_id": "mine"}, True) == {"request_id": "mine"}
    assert with_request_id({"max_tokens": 4}, False) == {"max_tokens": 4}


class GenerateStub(Stub):
    def Generate(self, request, timeout):
        self.calls.append(("generate", request.request_id, request.sampling.seed, timeout))
        return f"{self.name}:generate"


NOT_FOUND = FakeRpcError(grpc.StatusCode.NOT_FOUND)


def text_chunk(first, tokens, text, finish=None, seed=None) -> Chunk:
    return Chunk("r", first, tokens, text, finish, "worker-1", seed)


def test_a_request_found_nowhere_is_sent_again_and_its_delivered_prefix_skipped():
    a, b = GenerateStub("a"), GenerateStub("b")
    resubmission = Resubmission(build_request(prompt_token_ids=[1, 2], request_id="r"))
    state = FailoverState([a, b], "r", 0, detokenize=True, resubmission=resubmission)
    assert not resubmission.is_possible  # no seed yet: a new run could sample others
    state.on_chunk(text_chunk(0, (5, 6), "ab", seed=77))  # the gateway chose seed 77
    state.on_chunk(text_chunk(2, (7,), "c"))
    assert state.retry_wait_s(UNAVAILABLE) == 0.0 and state.next_call(9.0) == "b"
    # b finds it nowhere: it sends the request again, on b, with the seed pinned.
    assert state.retry_wait_s(NOT_FOUND) == 0.0
    assert state.next_call(8.0) == "b:generate"
    assert b.calls[-1] == ("generate", "r", 77, 8.0)
    assert resubmission.count == 1
    # The new run's tokens 0-2 are checked and skipped; a chunk across the boundary is
    # cut to what the caller lacks (its text too).
    assert state.on_chunk(text_chunk(0, (5,), "a", seed=77)) is None
    assert state.on_chunk(text_chunk(1, (6, 7, 8), "bcd")) == text_chunk(3, (8,), "d")
    assert state.on_chunk(text_chunk(4, (9,), "e", finish="length")) == text_chunk(
        4, (9,), "e", finish="length"
    )
    assert state.next_index == 5


def test_a_request_sent_again_that_ends_where_the_caller_stands_still_finishes():
    skip = Resubmission(build_request(seed=3, request_id="r"), [5, 6], "ab").skipper()
    assert skip.feed(text_chunk(0, (5, 6), "ab")) is None
    assert skip.feed(text_chunk(2, (), "", finish="length")) == text_chunk(
        2, (), "", finish="length"
    )


def test_a_request_sent_again_that_differs_fails_rather_than_yield_wrong_tokens():
    skip = Resubmission(build_request(seed=3, request_id="r"), [5, 6, 7]).skipper()
    assert skip.feed(text_chunk(0, (5,), "")) is None
    with pytest.raises(PrefixMismatch) as differs:
        skip.feed(text_chunk(1, (6, 9), ""))
    assert differs.value.code == grpc.StatusCode.DATA_LOSS
    assert "token 2 is 9 where the stream had delivered 7" in str(differs.value)


def test_without_a_seed_or_a_resubmission_a_request_found_nowhere_ends_the_stream():
    unseeded = Resubmission(build_request(request_id="r", temperature=0.8))
    state = FailoverState([GenerateStub("a")], "r", 0, False, resubmission=unseeded)
    assert state.retry_wait_s(NOT_FOUND) is None
    assert FailoverState([GenerateStub("a")], "r", 0, False).retry_wait_s(NOT_FOUND) is None
    # A seed the caller set is enough, before any chunk arrived.
    seeded = Resubmission(build_request(request_id="r", seed=5, temperature=0.8))
    assert FailoverState([Stub("a")], "r", 0, False, seeded).retry_wait_s(NOT_FOUND) == 0.0


def test_generate_streams_re_submit_by_default_with_failover_and_not_when_turned_off():
    request = build_request(prompt_token_ids=[1], request_id="r", seed=4)
    a, b = GenerateStub("a"), GenerateStub("b")
    state, call = generate_opener([a, b], request, 5.0, resubmit=True)(1)
    assert (call, state.gateway, state.resubmission.request.sampling.seed) == ("b:generate", 1, 4)
    off, _ = generate_opener([a, b], request, 5.0, resubmit=False)(0)
    alone, _ = generate_opener([a], request, 5.0, resubmit=True)(0)
    assert off.resubmission is None and alone.resubmission is None  # no failover: none
    assert off.retry_wait_s(NOT_FOUND) is None


def test_a_request_sent_again_that_runs_after_all_is_resumed_again():
    """A resume's sweep can miss a running request (mid-migration); sent again, a worker
    answers ALREADY_EXISTS: the SDK resumes it again instead of failing the stream (a
    chaos run's violation)."""
    a, b = GenerateStub("a"), GenerateStub("b")
    resubmission = Resubmission(build_request(prompt_token_ids=[1], request_id="r", seed=5))
    state = FailoverState([a, b], "r", 0, detokenize=False, resubmission=resubmission)
    state.on_chunk(chunk(0, (5, 6), seed=5))
    assert state.retry_wait_s(UNAVAILABLE) == 0.0 and state.next_call(9.0) == "b"
    assert state.retry_wait_s(NOT_FOUND) == 0.0 and state.next_call(9.0) == "b:generate"
    already = FakeRpcError(grpc.StatusCode.ALREADY_EXISTS)
    assert state.retry_wait_s(already) == 4 * FAILOVER_RETRY_S  # the third failure in a row
    assert state.next_call(7.0) == "b"  # a Resume, from the tokens the caller has
    assert b.calls[-1] == ("r", 2, False, 7.0)
    assert state.on_chunk(chunk(2, (7,))).token_ids == (7,)  # nothing skipped any more
    # ALREADY_EXISTS of a first Generate (not a re-submission) still ends the stream.
    fresh = FailoverState([a, b], "r", 0, False, resubmission=resubmission)
    assert fresh.retry_wait_s(already) is None
