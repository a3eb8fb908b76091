"""Live-migration knobs (part of the worker config)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MigrationConfig:
    """How migrations run on this worker, as source and as destination."""

    # Stop-and-copy once at most this many full blocks remain uncopied.
    last_stage_max_blocks: int = 2
    # Give up on converging and stop-and-copy after this many stages.
    max_stages: int = 8
    # Blocks travel in transfers of at most this many bytes (at least one block each),
    # through staging buffers that are reused: bounded memory, no page faults per copy.
    stage_chunk_bytes: int = 16 << 20
    # Extra blocks reserved at the handshake for tokens decoded during the copy.
    reserve_slack_blocks: int = 2
    # Destination frees a reservation when no migration RPC arrives for this long.
    lease_ms: int = 3000
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
    # Tests only: "pause_before_commit" or "pause_before_stage:N" (see fault_pause_s), or
    # "misdirect_stage:N": send stage N's bytes under a transfer id the destination does
    # not wait for, so the data plane times out (transfer_timeout_s) on both sides.
    fault: str = ""
    # How long a fault pause lasts.
    fault_pause_s: float = 60.0

    def __post_init__(self) -> None:
        for name in ("last_stage_max_blocks", "reserve_slack_blocks"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        for name in (
            "max_stages",
            "stage_chunk_bytes",
            "lease_ms",
            "max_incoming",
            "max_outgoing",
            "commit_attempts",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.fault and not (
            self.fault == "pause_before_commit"
            or self.fault.startswith(("pause_before_stage:", "misdirect_stage:"))
        ):
            raise ValueError(
                f"fault={self.fault!r} must be 'pause_before_commit', 'pause_before_stage:N' "
                "or 'misdirect_stage:N'"
            )
        for name in ("rpc_timeout_s", "transfer_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
