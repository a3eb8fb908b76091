"""Messages between the two sides, as dataclasses (the gRPC client converts them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from services.common.migration import MigrationStatus
from services.worker.engine import RequestState


@dataclass(frozen=True)
class MigrationTarget:
    """Where to move a request."""

    instance_id: str
    address: str  # worker gRPC address
    transport_address: bytes  # data-plane address


@dataclass(frozen=True)
class RequestHandoff:
    """What travels at commit: the engine state plus what the worker keeps beside it."""

    state: RequestState
    owner_address: str  # the gateway that streams this request's outputs
    trace_context: dict[str, str] = field(default_factory=dict)
    placement_epoch: int = 0  # +1 per committed move; the gateway keeps the newest


@dataclass(frozen=True)
class PrepareOffer:
    migration_id: str
    request_id: str
    src_instance_id: str
    src_transport_address: bytes
    num_blocks: int
    lease_s: float
    num_tokens: int
    kernels: str  # the source engine's kernel backend ("native" or "torch")
    trace_context: dict[str, str] = field(default_factory=dict)
    device: str = "cpu"  # the source engine's device_kind ("cpu", "cuda:<GPU name>")


@dataclass(frozen=True)
class PrepareReply:
    accepted: bool
    reason: str = ""
    kv_block_nbytes: int = 0


@dataclass(frozen=True)
class StageOffer:
    """Blocks [first_block_index, first_block_index + num_blocks) of the block table."""

    migration_id: str
    stage_index: int
    first_block_index: int
    num_blocks: int
    transfer_id: str
    is_last: bool


@dataclass(frozen=True)
class CommitOffer:
    migration_id: str
    handoff: RequestHandoff
    num_blocks: int


@dataclass(frozen=True)
class MigrationResult:
    migration_id: str
    request_id: str
    status: MigrationStatus
    reason: str = ""
    num_stages: int = 0
    num_blocks: int = 0
    downtime_ms: float = 0.0
    num_bytes: int = 0
    duration_ms: float = 0.0


class DestinationClient(Protocol):
    """The destination's migration RPCs as seen by the source (gRPC or in-process)."""

    async def prepare(self, offer: PrepareOffer) -> PrepareReply: ...

    async def stage(self, offer: StageOffer) -> tuple[bool, str]: ...

    async def commit(self, offer: CommitOffer) -> tuple[bool, str]: ...

    async def abort(self, migration_id: str, reason: str) -> bool: ...
