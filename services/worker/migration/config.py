"""Live-migration knobs (nested in the worker config as `WorkerConfig.migration`)."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.config import require


@dataclass(frozen=True)
class MigrationConfig:
    """How migrations run on this worker, as source and as destination."""

    # Which running requests migrate first (a registered selection policy).
    selection: str = "lowest_priority_first"
    # Stop-and-copy once at most this many full blocks remain uncopied.
    last_stage_max_blocks: int = 2
    # Give up on converging and stop-and-copy after this many stages.
    max_stages: int = 8
    # Blocks travel in transfers of at most this many bytes (at least one block each),
    # through staging buffers that are reused: bounded memory, no page faults per copy.
    stage_chunk_bytes: int = 16 << 20
    # Extra blocks reserved at the handshake for tokens decoded during the copy.
    reserve_slack_blocks: int = 2
    # Destination frees a reservation when no migration RPC arrives for this long, in seconds.
    lease_s: float = 3.0
    # Deadline of each migration RPC, in seconds.
    rpc_timeout_s: float = 5.0
    # Timeout of each stage's data-plane receive and send, in seconds.
    transfer_timeout_s: float = 20.0
    # Concurrent incoming migrations this worker accepts.
    max_incoming: int = 4
    # Concurrent outgoing migrations this worker runs.
    max_outgoing: int = 4
    # Commit retries (the RPC is idempotent) before the outcome counts as unknown.
    commit_attempts: int = 3

    def __post_init__(self) -> None:
        for name in ("last_stage_max_blocks", "reserve_slack_blocks"):
            value = getattr(self, name)
            require(value >= 0, f"{name}={value} must be >= 0")
        for name in (
            "max_stages",
            "stage_chunk_bytes",
            "max_incoming",
            "max_outgoing",
            "commit_attempts",
        ):
            value = getattr(self, name)
            require(value >= 1, f"{name}={value} must be >= 1")
        for name in ("lease_s", "rpc_timeout_s", "transfer_timeout_s"):
            value = getattr(self, name)
            require(value > 0, f"{name}={value} must be > 0")
