"""Gateway failover in the client SDK: where a stream stands, and where it goes on.

A stream's gateway that dies answers UNAVAILABLE; the request keeps running on its
worker. The SDK then calls Gateway.Resume(request_id, next_index) on the next gateway of
its list (cyclically, the first one included: it may be back), with a short backoff once
every gateway was tried, so the caller sees one stream without a gap or a repeated
token. `next_index` is the number of tokens already yielded to the caller.
"""

from __future__ import annotations

import uuid

import grpc

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

    def __init__(self, stubs: list, request_id: str, next_index: int, detokenize: bool) -> None:
        self.stubs = stubs
        self.request_id = request_id
        self.next_index = next_index
        self.detokenize = detokenize
        self.gateway = 0
        self.failures = 0  # failovers since the last chunk
        self.has_yielded = False
        self.failure: grpc.RpcError | None = None  # the UNAVAILABLE that began failing over

    def on_chunk(self, chunk):
        """Book a chunk (client.Chunk) about to be yielded; returns it as the caller sees it."""
        self.request_id = chunk.request_id
        self.next_index = chunk.first_token_index + len(chunk.token_ids)
        self.failures = 0
        if self.has_yielded and chunk.seed is not None:
            chunk = chunk._replace(seed=None)  # a resumed stream's first chunk repeats it
        self.has_yielded = True
        return chunk

    def retry_wait_s(self, exc: grpc.RpcError) -> float | None:
        """Seconds to wait before resuming on the next gateway; None: give up."""
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
        """Gateway.Resume on the current gateway."""
        request = gateway_pb2.ResumeRequest(
            request_id=self.request_id, next_index=self.next_index, detokenize=self.detokenize
        )
        return self.stubs[self.gateway].Resume(request, timeout=timeout)
