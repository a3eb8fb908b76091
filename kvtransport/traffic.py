"""Traffic classes: what a transfer carries decides its priority on the wire.

ActivationFlow is the one place that knows whether activations flow through a
transport right now; while they do, KV yields more (docs/kvtransport.md, "Priority").
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import StrEnum


class TrafficClass(StrEnum):
    """Strict priority order: every ACTIVATION message goes before any pending KV chunk."""

    ACTIVATION = "activation"  # pipeline hidden states: latency-critical, small to medium
    KV = "kv"  # KV-cache blocks: bulk, chunked, pausable


class ActivationFlow:
    """Whether activations flow through one transport: one was sent (to any peer) or
    received (from any peer) less than `quiet_s` ago. Its readers: the sender cuts new
    KV transfers in smaller chunks and narrows each peer's KV window, and UCX progress
    runs in short slices. A transport's process copies whatever KV reaches it on the
    one event-loop thread that also moves its activations, in either direction, so
    flowing means flowing through this process, not on one link. quiet_s 0: never.
    """

    def __init__(self, quiet_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._quiet_s = quiet_s
        self._clock = clock
        self._last_at = float("-inf")  # clock() when an activation last went out or came in

    def note_activation(self) -> None:
        """An activation message was issued or an activation header arrived, now."""
        self._last_at = self._clock()

    @property
    def is_flowing(self) -> bool:
        return self._clock() - self._last_at < self._quiet_s
