"""Traffic classes: what a transfer carries decides its priority on the wire."""

from __future__ import annotations

from enum import StrEnum


class TrafficClass(StrEnum):
    """Strict priority order: every ACTIVATION message goes before any pending KV chunk."""

    ACTIVATION = "activation"  # pipeline hidden states: latency-critical, small to medium
    KV = "kv"  # KV-cache blocks: bulk, chunked, pausable
