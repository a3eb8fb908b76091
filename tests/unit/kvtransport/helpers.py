"""Shared test helpers: fast deterministic payloads and a bounded wait for cleanup."""

from __future__ import annotations

import asyncio
import functools
import time

import torch

from kvtransport import Transport


def pattern(nbytes: int, salt: int = 0) -> torch.Tensor:
    """nbytes of position-dependent bytes (a misplaced chunk cannot go unnoticed)."""
    words = torch.arange(salt, salt + (nbytes + 3) // 4, dtype=torch.int64)
    mixed = (words * 2654435761 + 12345) % (1 << 32)
    return mixed.to(torch.int32).view(torch.uint8)[:nbytes].clone()


@functools.lru_cache(maxsize=4)
def cached_pattern(nbytes: int, salt: int = 0) -> torch.Tensor:
    """pattern() made once per session: for big payloads that tests only read."""
    return pattern(nbytes, salt)


async def wait_until(predicate, timeout: float = 5.0) -> None:
    """Poll until predicate() holds; fail the test if it never does."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not reached within {timeout}s")
        await asyncio.sleep(0.01)


def is_clean(transport: Transport) -> bool:
    stats = transport.stats()
    return (stats.num_pending_requests, stats.num_active_sends, stats.num_incoming) == (0, 0, 0)


async def assert_clean(*transports: Transport) -> None:
    """Nothing in flight, nothing being received (remembered tombstones are fine)."""
    await wait_until(lambda: all(is_clean(t) for t in transports))
    for transport in transports:
        stats = transport.stats()
        assert stats.num_pending_requests == 0
        assert stats.num_active_sends == 0
        assert stats.num_incoming == 0
