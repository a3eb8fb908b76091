"""When the client SDK tries a call again: UNAVAILABLE / RESOURCE_EXHAUSTED, with backoff.

    policy = RetryPolicy(max_attempts=10, initial_backoff_s=0.05, max_backoff_s=2.0)
    attempts = policy.begin()            # one per call
    delay_s = attempts.next_delay_s(code, retry_after_s)   # None: give up, raise

The wait before attempt n+1 is "full jitter" (uniform in [0, min(max_backoff_s,
initial_backoff_s * multiplier**(n-1))]), so refused clients spread out instead of
coming back together; a server's hint (`retry-after-ms`, sent with RESOURCE_EXHAUSTED)
is a floor on it. Attempts and the total time (max_total_s, waits included) are
bounded. Ten attempts span the channel's reconnect backoff (up to 2 s,
services/common/grpc_client.CHANNEL_OPTIONS): gRPC shares one connection per address
among a process's channels, so after a gateway restarted at its address even a new
client fails fast ("failed to connect") until that backoff ends; five attempts (at most
0.75 s of waits) ran out before it in `bench chaos`. The SDK never retries a stream
that already delivered a chunk (a committed stream): that error goes to the caller.
`rng`, `clock` and the sleeps are injectable so tests count attempts and waits exactly.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable

import grpc

RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})


class RetryPolicy:
    """How often and how long the SDK retries a refused call (see the module docstring)."""

    def __init__(
        self,
        *,
        max_attempts: int = 10,
        initial_backoff_s: float = 0.05,
        max_backoff_s: float = 2.0,
        multiplier: float = 2.0,
        max_total_s: float = 20.0,
        codes: frozenset[grpc.StatusCode] = RETRYABLE_CODES,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        async_sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts={max_attempts} must be >= 1")
        if initial_backoff_s < 0 or max_backoff_s < initial_backoff_s:
            raise ValueError(
                f"backoff must satisfy 0 <= initial_backoff_s={initial_backoff_s} "
                f"<= max_backoff_s={max_backoff_s}"
            )
        if multiplier < 1:
            raise ValueError(f"multiplier={multiplier} must be >= 1")
        if max_total_s < 0:
            raise ValueError(f"max_total_s={max_total_s} must be >= 0")
        self.max_attempts = max_attempts
        self.initial_backoff_s = initial_backoff_s
        self.max_backoff_s = max_backoff_s
        self.multiplier = multiplier
        self.max_total_s = max_total_s
        self.codes = frozenset(codes)
        self.rng = rng or random.Random()
        self.clock = clock
        self.sleep = sleep
        self.async_sleep = async_sleep

    def backoff_cap_s(self, num_failed: int) -> float:
        """The jitter's upper bound after `num_failed` (>= 1) failed attempts."""
        return min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (num_failed - 1))

    def begin(self) -> RetryAttempts:
        """The retry state of one call (started now)."""
        return RetryAttempts(self)


class RetryAttempts:
    """The attempts of one call so far; decides the wait before the next."""

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy
        self.num_failed = 0
        self.started_at = policy.clock()

    def next_delay_s(self, code: grpc.StatusCode, retry_after_s: float | None) -> float | None:
        """Seconds to wait before trying again after a failure with `code`; None: give up
        (not a retryable code, attempts used up, or the wait would pass max_total_s)."""
        policy = self.policy
        self.num_failed += 1
        if code not in policy.codes or self.num_failed >= policy.max_attempts:
            return None
        delay_s = policy.rng.uniform(0.0, policy.backoff_cap_s(self.num_failed))
        if retry_after_s is not None:
            delay_s = max(delay_s, retry_after_s)
        if policy.clock() - self.started_at + delay_s > policy.max_total_s:
            return None
        return delay_s
