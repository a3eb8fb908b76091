"""Gateway failover in the client SDK: where a stream stands, and where it goes on.

A stream's gateway that dies answers UNAVAILABLE; the request keeps running on its
worker. The SDK then calls Gateway.Resume(request_id, next_index) on the next gateway of
its list (cyclically, the first one included: it may be back), with a short backoff once
every gateway was tried, so the caller sees one stream without a gap or a repeated
token. `next_index` is the number of tokens already yielded to the caller.

A resume that finds the request nowhere (NOT_FOUND) re-submits it when the state has a
`Resubmission` (gateway/client_resubmit.py): the same request with its seed, on the
gateway that answered, the tokens the caller already has skipped and checked.
"""

from __future__ import annotations

import uuid

import grpc

from gateway.client_resubmit import PrefixSkip, Resubmission
from protos import gateway_pb2

# Failovers in a row (without a chunk in between) per gateway before giving up, and the
# first wait between them after the first (doubling, at most 8x): a gateway that just
# started needs a moment to learn the cluster.
FAILOVER_ROUNDS = 4
FAILOVER_RETRY_S = 0.2


def with_request_id(kwargs: dict, failover: bool) -> dict:
    """With failover the request id must be known before the first chunk: the client's."""
    if failover and not kwargs.get("request_id"):
        return {**kwargs, "request_id": uuid.uuid4().hex}
    return kwargs


class FailoverState:
    """One stream's request id, the next token index the caller has not seen, and
    which gateway (index into `stubs`) serves it."""

    def __init__(
        self,
        stubs: list,
        request_id: str,
        next_index: int,
        detokenize: bool,
        resubmission: Resubmission | None = None,
    ) -> None:
        """resubmission: re-submit the request when a resume finds it nowhere (None:
        that resume's NOT_FOUND ends the stream)."""
        self.stubs = stubs
        self.request_id = request_id
        self.next_index = next_index
        self.detokenize = detokenize
        self.resubmission = resubmission
        self.gateway = 0
        self.failures = 0  # failovers since the last chunk
        self.has_yielded = False
        self.failure: grpc.RpcError | None = None  # the UNAVAILABLE that began failing over
        self._resubmit_next = False  # the next call sends the request again
        self._skip: PrefixSkip | None = None  # a re-submitted stream's delivered prefix

    def on_chunk(self, chunk):
        """Book a chunk (client.Chunk) received; returns it as the caller sees it, or
        None when the caller already has all of it (a re-submitted stream's prefix).
        Raises PrefixMismatch when a re-submitted stream differs from that prefix."""
        if self._skip is not None:
            chunk = self._skip.feed(chunk)
            if chunk is None:
                return None
        self.request_id = chunk.request_id
        self.next_index = chunk.first_token_index + len(chunk.token_ids)
        self.failures = 0
        if self.has_yielded and chunk.seed is not None:
            chunk = chunk._replace(seed=None)  # a resumed stream's first chunk repeats it
        self.has_yielded = True
        if self.resubmission is not None:
            self.resubmission.on_delivered(chunk)
        return chunk

    def retry_wait_s(self, exc: grpc.RpcError) -> float | None:
        """Seconds to wait before resuming on the next gateway (or re-submitting on
        this one); None: give up."""
        if (
            exc.code() == grpc.StatusCode.NOT_FOUND
            and self.resubmission is not None
            and self.resubmission.is_possible
            and self.failures < FAILOVER_ROUNDS * max(len(self.stubs), 1)
        ):
            self._resubmit_next = True
            self.failures += 1
            return 0.0
        if (
            exc.code() == grpc.StatusCode.ALREADY_EXISTS
            and self._skip is not None  # the request sent again: it runs somewhere after all
            and self.failures < FAILOVER_ROUNDS * max(len(self.stubs), 1)
        ):
            # The resume's sweep missed it (e.g. between a migration's source and its
            # destination, or on a worker just registered): resume it again.
            wait_s = FAILOVER_RETRY_S * 2 ** min(self.failures, 3)
            self.failures += 1
            return wait_s
        if (
            exc.code() != grpc.StatusCode.UNAVAILABLE
            or len(self.stubs) < 2
            or not self.request_id
            or self.failures >= FAILOVER_ROUNDS * len(self.stubs)
        ):
            return None
        self.failure = self.failure or exc
        wait_s = 0.0 if self.failures == 0 else FAILOVER_RETRY_S * 2 ** min(self.failures - 1, 3)
        self.failures += 1
        self.gateway = (self.gateway + 1) % len(self.stubs)
        return wait_s

    def error_for(self, exc: grpc.RpcError) -> grpc.RpcError:
        """What the caller gets when the stream ends in `exc`: a failover that finds the
        request nowhere (NOT_FOUND: it never started, or was given up) reports the
        UNAVAILABLE that began it, as a stream without failover would."""
        if exc.code() == grpc.StatusCode.NOT_FOUND and self.failure is not None:
            return self.failure
        return exc

    def next_call(self, timeout: float):
        """Gateway.Resume on the current gateway (Generate when re-submitting)."""
        if self._resubmit_next:
            self._resubmit_next = False
            self._skip = self.resubmission.skipper()
            request = self.resubmission.request_again()
            return self.stubs[self.gateway].Generate(request, timeout=timeout)
        self._skip = None
        request = gateway_pb2.ResumeRequest(
            request_id=self.request_id, next_index=self.next_index, detokenize=self.detokenize
        )
        return self.stubs[self.gateway].Resume(request, timeout=timeout)


def resume_opener(
    stubs: list, request_id: str, next_index: int, detokenize: bool, timeout, resubmission
):
    """open_call for resume_stream: Gateway.Resume, each attempt from the first gateway."""

    def open_resume(_gateway: int):
        state = FailoverState(stubs, request_id, next_index, detokenize, resubmission)
        return state, state.next_call(timeout)

    return open_resume


def generate_opener(stubs: list, request: gateway_pb2.GenerateRequest, timeout, resubmit: bool):
    """open_call for generate_stream: Generate on the given gateway; with failover and
    `resubmit`, a resume that finds nothing later re-submits the request."""
    failover = len(stubs) > 1
    resubmission = Resubmission(request) if failover and resubmit else None

    def open_generate(gateway: int):
        state = FailoverState(stubs, request.request_id, 0, request.detokenize, resubmission)
        state.gateway = gateway
        return state, stubs[gateway].Generate(request, timeout=timeout)

    return open_generate
