"""KunServe knobs of a worker (nested in the worker config as `WorkerConfig.kunserve`)."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.config import require

# services.worker.engine.micro_batching.FORMATIONS (this config stays torch-free).
MICRO_BATCHING = ("lookahead", "simple")


@dataclass(frozen=True)
class KunServeConfig:
    """How this worker drops, pipelines, exchanges and restores as a group member."""

    # Deadline of each member-to-member RPC (prepare, join, exchange, leave), in seconds.
    rpc_timeout_s: float = 60.0
    # Timeout of each KV / weight transfer between members, in seconds.
    transfer_timeout_s: float = 120.0
    # Micro-batches stage 0 keeps in flight; 0 = one per stage (every stage busy).
    max_in_flight: int = 0
    # How stage 0 cuts its work into micro-batches: "lookahead" (equal modelled costs,
    # long prefills cut into chunks) or "simple" (an even share of the step's limits each).
    micro_batching: str = "lookahead"
    # The cost model lookahead balances with: a built-in profile name or a calibrate JSON.
    cost_profile: str = "tiny-cpu"
    # Lookahead: the smallest prefill chunk it cuts (below a prompt's remainder).
    min_chunk_tokens: int = 32
    # Deadline of each health Watch on the other members (then it is re-opened), in seconds.
    watch_rotate_s: float = 300.0

    def __post_init__(self) -> None:
        require(self.max_in_flight >= 0, f"max_in_flight={self.max_in_flight} must be >= 0")
        require(
            self.micro_batching in MICRO_BATCHING,
            f"micro_batching={self.micro_batching!r} must be one of {MICRO_BATCHING}",
        )
        require(
            self.min_chunk_tokens >= 1, f"min_chunk_tokens={self.min_chunk_tokens} must be >= 1"
        )
        for name in ("rpc_timeout_s", "transfer_timeout_s", "watch_rotate_s"):
            value = getattr(self, name)
            require(value > 0, f"{name}={value} must be > 0")
