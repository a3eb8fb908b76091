"""KunServe knobs of a worker (nested in the worker config as `WorkerConfig.kunserve`)."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.config import require


@dataclass(frozen=True)
class KunServeConfig:
    """How this worker drops, pipelines, exchanges and restores as a group member."""

    # Deadline of each member-to-member RPC (prepare, join, exchange, leave), in seconds.
    rpc_timeout_s: float = 60.0
    # Timeout of each KV / weight transfer between members, in seconds.
    transfer_timeout_s: float = 120.0
    # Micro-batches stage 0 keeps in flight; 0 = one per stage (every stage busy).
    max_in_flight: int = 0
    # Deadline of each health Watch on the other members (then it is re-opened), in seconds.
    watch_rotate_s: float = 300.0

    def __post_init__(self) -> None:
        require(self.max_in_flight >= 0, f"max_in_flight={self.max_in_flight} must be >= 0")
        for name in ("rpc_timeout_s", "transfer_timeout_s", "watch_rotate_s"):
            value = getattr(self, name)
            require(value > 0, f"{name}={value} must be > 0")
