"""Per-client-key limits at the gateway: concurrent requests and a token-bucket rate.

A client is known by the sha256 of its bearer token (gRPC metadata `authorization:
Bearer <key>`, HTTP `Authorization: Bearer <key>`), "anonymous" without one, so keys
never sit in memory or logs in the clear. Both limits are off unless configured
(GatewayConfig.key_max_concurrent / key_rate_per_s). A refusal is RESOURCE_EXHAUSTED
whose retry hint is exact: when the bucket holds its next token, or (concurrency) the
configured `retry_after_s`.

    acquire(key)  -> counts one request in flight for the key, or raises
    release(key)  <- the request ended (every acquire is paired with one release)
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass

from services.common.errors import ResourceExhaustedError

ANONYMOUS = "anonymous"
# Buckets kept before idle ones (full, nothing in flight) are forgotten: a forgotten
# bucket is indistinguishable from a fresh one, so pruning never changes a decision.
MAX_IDLE_KEYS = 10_000


def client_key(authorization: str | None) -> str:
    """sha256 hex of the bearer token in an `authorization` value; ANONYMOUS without one."""
    if not authorization:
        return ANONYMOUS
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return ANONYMOUS
    return hashlib.sha256(token.encode()).hexdigest()


def key_from_metadata(metadata) -> str:
    """The client key of a gRPC call's invocation metadata."""
    for key, value in metadata or ():
        if key.lower() == "authorization":
            return client_key(value if isinstance(value, str) else value.decode())
    return ANONYMOUS


@dataclass
class _KeyState:
    tokens: float
    refilled_at: float
    num_inflight: int = 0


class KeyLimits:
    """Concurrency and rate per client key. None turns a limit off."""

    def __init__(
        self,
        *,
        max_concurrent: int | None = None,
        rate_per_s: float | None = None,
        burst: int = 1,
        retry_after_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_concurrent is not None and max_concurrent <= 0:
            raise ValueError(f"key_max_concurrent={max_concurrent} must be > 0 or None")
        if rate_per_s is not None and rate_per_s <= 0:
            raise ValueError(f"key_rate_per_s={rate_per_s} must be > 0 or None")
        if burst < 1:
            raise ValueError(f"key_burst={burst} must be >= 1")
        self.max_concurrent = max_concurrent
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.retry_after_s = retry_after_s
        self._clock = clock
        self._keys: dict[str, _KeyState] = {}

    @property
    def is_enabled(self) -> bool:
        return self.max_concurrent is not None or self.rate_per_s is not None

    def num_inflight(self, key: str) -> int:
        state = self._keys.get(key)
        return 0 if state is None else state.num_inflight

    def _state(self, key: str, now: float) -> _KeyState:
        state = self._keys.get(key)
        if state is None:
            if len(self._keys) >= MAX_IDLE_KEYS:
                self._forget_idle(now)
            state = self._keys[key] = _KeyState(tokens=float(self.burst), refilled_at=now)
        elif self.rate_per_s is not None:
            elapsed = max(0.0, now - state.refilled_at)
            state.tokens = min(float(self.burst), state.tokens + elapsed * self.rate_per_s)
            state.refilled_at = now
        return state

    def _forget_idle(self, now: float) -> None:
        for key in [k for k, s in self._keys.items() if s.num_inflight == 0]:
            state = self._state(key, now)
            if state.tokens >= self.burst:
                del self._keys[key]

    def acquire(self, key: str) -> None:
        """Count one more request for `key`; ResourceExhaustedError past a limit."""
        if not self.is_enabled:
            return
        now = self._clock()
        state = self._state(key, now)
        if self.max_concurrent is not None and state.num_inflight >= self.max_concurrent:
            raise ResourceExhaustedError(
                f"client key has {state.num_inflight} requests in flight (key_max_concurrent="
                f"{self.max_concurrent}); retry later",
                self.retry_after_s,
            )
        if self.rate_per_s is not None:
            if state.tokens < 1.0:
                wait_s = (1.0 - state.tokens) / self.rate_per_s
                raise ResourceExhaustedError(
                    f"client key is over its rate (key_rate_per_s={self.rate_per_s}, "
                    f"key_burst={self.burst}); retry in {wait_s:.3f}s",
                    wait_s,
                )
            state.tokens -= 1.0
        state.num_inflight += 1

    def release(self, key: str) -> None:
        """The request counted by acquire(key) ended."""
        if not self.is_enabled:
            return
        state = self._keys.get(key)
        if state is not None and state.num_inflight > 0:
            state.num_inflight -= 1
