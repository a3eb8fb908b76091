"""The client SDK's retries against a real gRPC server that refuses, then serves.

Exact attempt counts and waits: the policy's RNG is seeded, its sleeps are recorded
(and move a FakeClock) instead of sleeping."""

from __future__ import annotations

import asyncio
import random

import grpc
import pytest

from gateway.client import AsyncClient, Client, GatewayError
from gateway.retry import RetryPolicy
from protos import common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.clock import FakeClock

TOKENS = [11, 12, 13]


class RefusingGateway(gateway_pb2_grpc.GatewayServicer):
    """Refuses the first `num_refusals` calls with `code` (and a retry hint), then
    streams TOKENS one chunk each; with `fail_after`, fails UNAVAILABLE after that
    many chunks instead of finishing."""

    def __init__(self, num_refusals=0, code=grpc.StatusCode.RESOURCE_EXHAUSTED, hint_ms=None):
        self.num_refusals = num_refusals
        self.code = code
        self.hint_ms = hint_ms
        self.fail_after: int | None = None
        self.num_calls = 0

    async def _refuse_or_pass(self, context) -> None:
        self.num_calls += 1
        if self.num_calls <= self.num_refusals:
            metadata = () if self.hint_ms is None else (("retry-after-ms", str(self.hint_ms)),)
            await context.abort(self.code, f"refusal {self.num_calls}", metadata)

    async def Generate(self, request, context):
        await self._refuse_or_pass(context)
        for index, token in enumerate(TOKENS):
            if self.fail_after == index:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "gateway going away")
            is_last = index == len(TOKENS) - 1
            yield gateway_pb2.GenerateChunk(
                request_id="r",
                first_token_index=index,
                token_ids=[token],
                finish_reason=common_pb2.FINISH_REASON_LENGTH if is_last else 0,
            )

    async def GenerateUnary(self, request, context):
        await self._refuse_or_pass(context)
        return gateway_pb2.GenerateResponse(
            request_id="r", token_ids=TOKENS, finish_reason=common_pb2.FINISH_REASON_LENGTH
        )


@pytest.fixture
async def served():
    servicer = RefusingGateway()
    server = grpc.aio.server()
    gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield servicer, f"127.0.0.1:{port}"
    await server.stop(0)


class Recorder:
    """The policy's sleeps: recorded, and the fake clock moves by each."""

    def __init__(self) -> None:
        self.clock = FakeClock()
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.clock.now += seconds

    async def async_sleep(self, seconds: float) -> None:
        self.sleep(seconds)

    def policy(self, seed: int = 7, **kwargs) -> RetryPolicy:
        return RetryPolicy(
            rng=random.Random(seed),
            clock=self.clock,
            sleep=self.sleep,
            async_sleep=self.async_sleep,
            **kwargs,
        )


def expected_sleeps(seed: int, num: int, hint_s: float | None = None, **kwargs) -> list[float]:
    """Full jitter under the doubling cap, the hint as a floor: what a policy seeded
    alike must wait."""
    policy, rng = RetryPolicy(**kwargs), random.Random(seed)
    sleeps = []
    for failed in range(1, num + 1):
        delay = rng.uniform(0.0, policy.backoff_cap_s(failed))
        sleeps.append(delay if hint_s is None else max(delay, hint_s))
    return sleeps


async def test_a_refused_stream_is_retried_honouring_the_retry_hint(served):
    servicer, address = served
    servicer.num_refusals, servicer.hint_ms = 3, 60
    recorder = Recorder()
    async with AsyncClient(address, timeout_s=10, retry=recorder.policy()) as client:
        chunks = [c async for c in client.generate_stream(prompt_token_ids=[1])]
    assert [t for c in chunks for t in c.token_ids] == TOKENS
    assert servicer.num_calls == 4
    assert recorder.sleeps == expected_sleeps(7, 3, hint_s=0.06)
    # The hint is a floor, the jitter is not: both show up in a seeded run.
    assert 0.06 in recorder.sleeps and any(s > 0.06 for s in recorder.sleeps)


async def test_the_blocking_client_retries_unavailable_with_jittered_backoff(served):
    servicer, address = served
    servicer.num_refusals, servicer.code = 2, grpc.StatusCode.UNAVAILABLE
    recorder = Recorder()

    def run() -> list:  # in a thread: the server runs on this test's event loop
        with Client(address, timeout_s=10, retry=recorder.policy(seed=3)) as client:
            assert client.generate(prompt_token_ids=[1]).token_ids == tuple(TOKENS)
            servicer.num_calls = 0
            return list(client.generate_stream(prompt_token_ids=[1]))

    chunks = await asyncio.to_thread(run)
    assert [t for c in chunks for t in c.token_ids] == TOKENS
    assert servicer.num_calls == 3
    # Each call has its own attempts (the caps restart), one RNG across calls.
    policy, rng = RetryPolicy(), random.Random(3)
    assert recorder.sleeps == [rng.uniform(0, policy.backoff_cap_s(n)) for n in (1, 2, 1, 2)]


async def test_attempts_are_bounded_and_the_last_refusal_is_raised(served):
    servicer, address = served
    servicer.num_refusals, servicer.hint_ms = 100, 250
    recorder = Recorder()
    async with AsyncClient(address, timeout_s=10, retry=recorder.policy(max_attempts=3)) as client:
        with pytest.raises(GatewayError) as info:
            await client.generate(prompt_token_ids=[1])
    assert (info.value.code, info.value.details) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "refusal 3",
    )
    assert info.value.retry_after_s == 0.25
    assert (servicer.num_calls, len(recorder.sleeps)) == (3, 2)


async def test_the_total_time_is_bounded(served):
    servicer, address = served
    servicer.num_refusals, servicer.hint_ms = 100, 600
    recorder = Recorder()
    async with AsyncClient(address, timeout_s=10, retry=recorder.policy(max_total_s=1.0)) as client:
        with pytest.raises(GatewayError) as info:
            await client.generate(prompt_token_ids=[1])
    # 0.6 s fits in 1 s; a second 0.6 s would not: two attempts.
    assert (info.value.details, servicer.num_calls, recorder.sleeps) == ("refusal 2", 2, [0.6])


async def test_a_committed_stream_is_never_retried(served):
    servicer, address = served
    servicer.fail_after = 1
    recorder = Recorder()
    received = []
    async with AsyncClient(address, timeout_s=10, retry=recorder.policy()) as client:
        with pytest.raises(GatewayError) as info:
            async for chunk in client.generate_stream(prompt_token_ids=[1]):
                received.extend(chunk.token_ids)
    assert (info.value.code, info.value.details) == (
        grpc.StatusCode.UNAVAILABLE,
        "gateway going away",
    )
    assert (received, servicer.num_calls, recorder.sleeps) == ([11], 1, [])


async def test_the_blocking_client_never_retries_a_committed_stream(served):
    servicer, address = served
    servicer.fail_after = 2
    recorder = Recorder()
    received = []

    def run() -> None:
        with Client(address, timeout_s=10, retry=recorder.policy()) as client:
            for chunk in client.generate_stream(prompt_token_ids=[1]):
                received.extend(chunk.token_ids)

    with pytest.raises(GatewayError) as info:
        await asyncio.to_thread(run)
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert (received, servicer.num_calls, recorder.sleeps) == ([11, 12], 1, [])


@pytest.mark.parametrize(
    ("code", "retry"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, "policy"),  # not retryable
        (grpc.StatusCode.RESOURCE_EXHAUSTED, None),  # retries off
    ],
)
async def test_no_retry_for_other_codes_or_without_a_policy(served, code, retry):
    servicer, address = served
    servicer.num_refusals, servicer.code = 1, code
    recorder = Recorder()
    policy = recorder.policy() if retry == "policy" else None
    async with AsyncClient(address, timeout_s=10, retry=policy) as client:
        with pytest.raises(GatewayError) as info:
            await client.generate(prompt_token_ids=[1])
    assert (info.value.code, servicer.num_calls, recorder.sleeps) == (code, 1, [])


def test_bad_policies_name_the_field():
    with pytest.raises(ValueError, match="max_attempts=0 must be >= 1"):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError, match="initial_backoff_s=3 <= max_backoff_s=2"):
        RetryPolicy(initial_backoff_s=3, max_backoff_s=2)
