"""gateway.client_failover: which gateway a dead stream goes on at, from which token."""

from __future__ import annotations

import grpc

from gateway.client import Chunk
from gateway.client_failover import FAILOVER_RETRY_S, FailoverState, with_request_id
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
