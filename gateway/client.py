"""A small Python client for the llmesh gateway, over the generated gRPC stubs.

    async with AsyncClient("127.0.0.1:50051") as client:
        async for chunk in client.generate_stream("Hello", max_tokens=8):
            print(chunk.token_ids)
        result = await client.generate(prompt_token_ids=[1, 2, 3], seed=7)

    with Client("127.0.0.1:50051") as client:
        print(client.generate("Hello").text)

Values are sent as given (the gateway validates them); errors raise GatewayError with
the gRPC status code and the gateway's message. Every call has a deadline.

Gateway failover: with `failover_addresses`, a stream whose gateway dies (UNAVAILABLE)
goes on on the next gateway (Gateway.Resume with the request id and the number of tokens
already yielded), so the caller sees one stream without a gap or a repeated token. The
client then chooses the request id (a uuid) unless the caller gave one.
`resume_stream(request_id, next_index)` resumes a stream explicitly. A resume that
finds the request nowhere (its worker died with its gateway, or it was never placed)
re-submits it (gateway/client_resubmit.py: the same request and seed, the tokens the
caller has skipped and checked, DATA_LOSS if they differ); on by default with
failover (`resubmit=False` turns it off), and for `resume_stream` when given the
original request (`resubmission=Resubmission(build_request(...), delivered_tokens)`).

Retries (gateway/retry.py): `retry=` takes a RetryPolicy; by default generate() and
generate_stream() retry UNAVAILABLE and RESOURCE_EXHAUSTED (admission control, honouring
its `retry-after-ms` hint) with jittered backoff, up to 10 attempts within 20 s; a
stream that already delivered a chunk is never retried (its error is raised).
`retry=None` turns retries off: the first refusal is raised (load generators that count
refusals, tests). abort() and model_info() are never retried.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import grpc

from gateway.client_channel import aio_gateway_channel, gateway_channel
from gateway.client_failover import (
    FailoverState,
    generate_opener,
    resume_opener,
    with_request_id,
)
from gateway.client_resubmit import PrefixMismatch, Resubmission
from gateway.retry import RetryAttempts, RetryPolicy
from protos import common_pb2, gateway_pb2, gateway_pb2_grpc
from services.common.errors import retry_after_s_from_metadata

DEFAULT_TIMEOUT_S = 120.0  # whole-generation deadline unless a call says otherwise
CONTROL_TIMEOUT_S = 5.0  # abort, model info
DEFAULT_RETRY = RetryPolicy()  # what `retry=` is unless given

_FINISH_NAMES = {
    common_pb2.FINISH_REASON_UNSPECIFIED: None,
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_ABORT: "abort",
    common_pb2.FINISH_REASON_ERROR: "error",
}


class GatewayError(Exception):
    """A call failed: `code` is the grpc.StatusCode, `details` the gateway's message,
    `retry_after_s` the gateway's retry hint (RESOURCE_EXHAUSTED), else None."""

    def __init__(
        self, code: grpc.StatusCode, details: str, retry_after_s: float | None = None
    ) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.retry_after_s = retry_after_s


class Chunk(NamedTuple):
    """Some tokens of a streamed generation (a NamedTuple: one per streamed message)."""

    request_id: str
    first_token_index: int
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str | None  # "length" | "stop" | "abort" | "error" on the last chunk
    instance_id: str
    seed: int | None  # set on the first chunk


@dataclass(frozen=True)
class Generation:
    """A whole generation."""

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str | None
    num_prompt_tokens: int
    seed: int


@dataclass(frozen=True)
class ModelInfo:
    model_id: str
    vocab_size: int
    max_model_len: int
    eos_token_id: int
    num_instances: int


def build_request(
    prompt: str | None = None,
    *,
    prompt_token_ids: Sequence[int] | None = None,
    max_tokens: int = 16,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    stop_token_ids: Sequence[int] = (),
    ignore_eos: bool = False,
    request_id: str = "",
    priority: int = 0,
    detokenize: bool = False,
) -> gateway_pb2.GenerateRequest:
    sampling = common_pb2.SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        stop_token_ids=list(stop_token_ids),
        ignore_eos=ignore_eos,
    )
    if seed is not None:
        sampling.seed = seed
    return gateway_pb2.GenerateRequest(
        prompt=prompt or "",
        prompt_token_ids=list(prompt_token_ids or ()),
        sampling=sampling,
        request_id=request_id,
        priority=priority,
        detokenize=detokenize,
    )


def _chunk(message: gateway_pb2.GenerateChunk) -> Chunk:
    return Chunk(
        request_id=message.request_id,
        first_token_index=message.first_token_index,
        token_ids=tuple(message.token_ids),
        text=message.text,
        finish_reason=_FINISH_NAMES.get(message.finish_reason),
        instance_id=message.instance_id,
        seed=message.seed if message.HasField("seed") else None,
    )


def _generation(reply: gateway_pb2.GenerateResponse) -> Generation:
    return Generation(
        request_id=reply.request_id,
        token_ids=tuple(reply.token_ids),
        text=reply.text,
        finish_reason=_FINISH_NAMES.get(reply.finish_reason),
        num_prompt_tokens=reply.num_prompt_tokens,
        seed=reply.seed,
    )


def _model_info(reply: gateway_pb2.ModelInfo) -> ModelInfo:
    return ModelInfo(
        reply.model_id,
        reply.vocab_size,
        reply.max_model_len,
        reply.eos_token_id,
        reply.num_instances,
    )


def _error(exc: grpc.RpcError) -> GatewayError:
    return GatewayError(
        exc.code(), exc.details() or "", retry_after_s_from_metadata(exc.trailing_metadata())
    )


def _delivered(state: FailoverState, message: gateway_pb2.GenerateChunk) -> Chunk | None:
    """The chunk the caller gets for a message (None: it has those tokens already)."""
    try:
        return state.on_chunk(_chunk(message))
    except PrefixMismatch as exc:
        raise GatewayError(exc.code, str(exc)) from None


def _retry_delay_s(attempts: RetryAttempts | None, error: GatewayError) -> float | None:
    """Seconds to wait before the next attempt; None: raise `error`."""
    if attempts is None:
        return None
    return attempts.next_delay_s(error.code, error.retry_after_s)


class AsyncClient:
    """asyncio client; one channel per gateway, reused by every call (the first
    gateway's for everything but a failover)."""

    def __init__(
        self,
        address: str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        api_key: str | None = None,
        root_certificates: bytes | None = None,
        failover_addresses: Sequence[str] = (),
        retry: RetryPolicy | None = DEFAULT_RETRY,
        resubmit: bool = True,
    ) -> None:
        """resubmit: with failover_addresses, a resume that finds the request nowhere
        re-submits it (module docstring); False: that stream fails (UNAVAILABLE)."""
        self.address = address
        self.timeout_s = timeout_s
        self.retry = retry
        self.resubmit = resubmit
        self._channels = [
            aio_gateway_channel(a, api_key, root_certificates)
            for a in (address, *failover_addresses)
        ]
        self._stubs = [gateway_pb2_grpc.GatewayStub(c) for c in self._channels]
        self._channel, self._stub = self._channels[0], self._stubs[0]

    async def generate_stream(
        self, prompt: str | None = None, *, timeout_s: float | None = None, **kwargs
    ) -> AsyncIterator[Chunk]:
        """Chunks as they are produced; leaving the loop early cancels (aborts) the
        request. Retried (self.retry) until the first chunk arrived; after it, a dead
        gateway's stream goes on on a failover gateway."""
        request = build_request(prompt, **with_request_id(kwargs, len(self._stubs) > 1))
        timeout = timeout_s or self.timeout_s
        opener = generate_opener(self._stubs, request, timeout, self.resubmit)
        async for chunk in self._retried(opener, timeout):
            yield chunk

    async def resume_stream(
        self,
        request_id: str,
        next_index: int,
        *,
        detokenize: bool = False,
        timeout_s: float | None = None,
        resubmission: Resubmission | None = None,
    ) -> AsyncIterator[Chunk]:
        """The stream of a request started through another gateway, from token index
        next_index (the tokens the caller already has); retried (self.retry) until its
        first chunk, like generate_stream. With `resubmission` (the original request and
        the tokens delivered), a request found nowhere is sent again."""
        timeout = timeout_s or self.timeout_s
        opener = resume_opener(
            self._stubs, request_id, next_index, detokenize, timeout, resubmission
        )
        async for chunk in self._retried(opener, timeout):
            yield chunk

    async def _retried(self, open_call, timeout: float) -> AsyncIterator[Chunk]:
        """A stream opened by open_call(gateway) -> (FailoverState, call): retried
        (self.retry) until its first chunk, failed over (_follow) after it."""
        attempts = self.retry.begin() if self.retry is not None else None
        gateway = 0
        while True:
            state, call = open_call(gateway)
            try:
                async for chunk in self._follow(state, call, timeout):
                    yield chunk
                return
            except GatewayError as error:
                delay_s = None if state.has_yielded else _retry_delay_s(attempts, error)
                if delay_s is None:
                    raise
            gateway = state.gateway  # a failover that found nothing moved on
            await self.retry.async_sleep(delay_s)

    async def _follow(self, state: FailoverState, call, timeout: float) -> AsyncIterator[Chunk]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                async for message in call:
                    if (chunk := _delivered(state, message)) is not None:
                        yield chunk
                return
            except grpc.aio.AioRpcError as exc:
                wait_s = state.retry_wait_s(exc)
                if wait_s is None or time.monotonic() + wait_s >= deadline:
                    raise _error(state.error_for(exc)) from None
            finally:
                call.cancel()
            await asyncio.sleep(wait_s)
            call = state.next_call(deadline - time.monotonic())

    async def generate(
        self, prompt: str | None = None, *, timeout_s: float | None = None, **kwargs
    ) -> Generation:
        request = build_request(prompt, **kwargs)
        attempts = self.retry.begin() if self.retry is not None else None
        while True:
            try:
                reply = await self._stub.GenerateUnary(request, timeout=timeout_s or self.timeout_s)
                return _generation(reply)
            except grpc.aio.AioRpcError as exc:
                error = _error(exc)
                delay_s = _retry_delay_s(attempts, error)
                if delay_s is None:
                    raise error from None
            await self.retry.async_sleep(delay_s)

    async def abort(self, request_id: str, *, timeout_s: float = CONTROL_TIMEOUT_S) -> bool:
        try:
            reply = await self._stub.Abort(
                gateway_pb2.AbortRequest(request_id=request_id), timeout=timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            raise _error(exc) from None
        return reply.aborted

    async def model_info(self, *, timeout_s: float = CONTROL_TIMEOUT_S) -> ModelInfo:
        try:
            reply = await self._stub.GetModelInfo(
                gateway_pb2.GetModelInfoRequest(), timeout=timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            raise _error(exc) from None
        return _model_info(reply)

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


class Client:
    """Blocking client with the same calls as AsyncClient."""

    def __init__(
        self,
        address: str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        api_key: str | None = None,
        root_certificates: bytes | None = None,
        failover_addresses: Sequence[str] = (),
        retry: RetryPolicy | None = DEFAULT_RETRY,
        resubmit: bool = True,
    ) -> None:
        """resubmit: with failover_addresses, a resume that finds the request nowhere
        re-submits it (module docstring); False: that stream fails (UNAVAILABLE)."""
        self.address = address
        self.timeout_s = timeout_s
        self.retry = retry
        self.resubmit = resubmit
        self._channels = [
            gateway_channel(a, api_key, root_certificates) for a in (address, *failover_addresses)
        ]
        self._stubs = [gateway_pb2_grpc.GatewayStub(c) for c in self._channels]
        self._channel, self._stub = self._channels[0], self._stubs[0]

    def generate_stream(
        self, prompt: str | None = None, *, timeout_s: float | None = None, **kwargs
    ) -> Iterator[Chunk]:
        request = build_request(prompt, **with_request_id(kwargs, len(self._stubs) > 1))
        timeout = timeout_s or self.timeout_s
        yield from self._retried(
            generate_opener(self._stubs, request, timeout, self.resubmit), timeout
        )

    def resume_stream(
        self,
        request_id: str,
        next_index: int,
        *,
        detokenize: bool = False,
        timeout_s: float | None = None,
        resubmission: Resubmission | None = None,
    ) -> Iterator[Chunk]:
        timeout = timeout_s or self.timeout_s
        opener = resume_opener(
            self._stubs, request_id, next_index, detokenize, timeout, resubmission
        )
        yield from self._retried(opener, timeout)

    def _retried(self, open_call, timeout: float) -> Iterator[Chunk]:
        """AsyncClient._retried, blocking."""
        attempts = self.retry.begin() if self.retry is not None else None
        gateway = 0
        while True:
            state, call = open_call(gateway)
            try:
                yield from self._follow(state, call, timeout)
                return
            except GatewayError as error:
                delay_s = None if state.has_yielded else _retry_delay_s(attempts, error)
                if delay_s is None:
                    raise
            gateway = state.gateway  # a failover that found nothing moved on
            self.retry.sleep(delay_s)

    def _follow(self, state: FailoverState, call, timeout: float) -> Iterator[Chunk]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                for message in call:
                    if (chunk := _delivered(state, message)) is not None:
                        yield chunk
                return
            except grpc.RpcError as exc:
                wait_s = state.retry_wait_s(exc)
                if wait_s is None or time.monotonic() + wait_s >= deadline:
                    raise _error(state.error_for(exc)) from None
            finally:
                call.cancel()
            time.sleep(wait_s)
            call = state.next_call(deadline - time.monotonic())

    def generate(
        self, prompt: str | None = None, *, timeout_s: float | None = None, **kwargs
    ) -> Generation:
        request = build_request(prompt, **kwargs)
        attempts = self.retry.begin() if self.retry is not None else None
        while True:
            try:
                reply = self._stub.GenerateUnary(request, timeout=timeout_s or self.timeout_s)
                return _generation(reply)
            except grpc.RpcError as exc:
                error = _error(exc)
                delay_s = _retry_delay_s(attempts, error)
                if delay_s is None:
                    raise error from None
            self.retry.sleep(delay_s)

    def abort(self, request_id: str, *, timeout_s: float = CONTROL_TIMEOUT_S) -> bool:
        try:
            reply = self._stub.Abort(
                gateway_pb2.AbortRequest(request_id=request_id), timeout=timeout_s
            )
        except grpc.RpcError as exc:
            raise _error(exc) from None
        return reply.aborted

    def model_info(self, *, timeout_s: float = CONTROL_TIMEOUT_S) -> ModelInfo:
        try:
            reply = self._stub.GetModelInfo(gateway_pb2.GetModelInfoRequest(), timeout=timeout_s)
        except grpc.RpcError as exc:
            raise _error(exc) from None
        return _model_info(reply)

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
