"""Plain dataclasses for the v1 messages that cross service boundaries.

Servicers convert protobuf to these at the edge (services.common.convert) and the rest
of each service works with them only, so protobuf never reaches the engine, the
policies or the gateway's request logic. One dataclass per message, named after what
it means rather than after the proto (which would clash with engine types).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import NamedTuple

from services.scheduler.policies import InstanceLoad, RunningRequest


class FinishReason(enum.Enum):
    """Why a request stopped (mirrors llmesh.v1.FinishReason)."""

    NONE = "none"  # still running
    LENGTH = "length"  # max_tokens reached
    STOP = "stop"  # EOS or a stop token
    ABORT = "abort"  # aborted by the client or an operator
    ERROR = "error"  # failed; see the error text

    @classmethod
    def from_engine(cls, reason: str | None) -> FinishReason:
        """The engine reports "length" | "stop" | "abort" | None."""
        return cls.NONE if reason is None else cls(reason)


@dataclass(frozen=True)
class InstanceSpec:
    """Static facts about one worker instance (InstanceInfo)."""

    instance_id: str
    address: str  # worker gRPC host:port
    model_id: str
    block_size: int
    num_layers: int
    layer_start: int
    layer_end: int
    max_model_len: int
    vocab_size: int
    eos_token_id: int  # -1 when the model has none
    memory_capacity_bytes: int = 0
    transport_address: bytes = b""  # data-plane (UCX worker) address; empty until kvtransport
    transport_backend: str = ""
    kernels: str = ""  # the engine's kernel backend, "native" or "torch" ("" = not reported)


@dataclass(frozen=True)
class RunningRequestSummary:
    """A running request as a load report lists it."""

    request_id: str
    num_tokens: int
    num_blocks: int
    priority: int


@dataclass(frozen=True)
class LoadSnapshot:
    """One load report of one instance (LoadReport)."""

    instance_id: str
    seq: int
    num_running: int
    num_waiting: int
    num_total_blocks: int
    num_used_blocks: int
    num_hol_blocks: int = 0
    num_running_high_priority: int = 0
    virtual_usage: float = 0.0
    freeness: float = 0.0
    is_terminating: bool = False
    num_preemptions: int = 0
    num_migrating: int = 0
    running: tuple[RunningRequestSummary, ...] = ()
    num_waiting_blocks: int = 0  # queued demand: blocks every waiting request needs
    num_headroom_blocks: int = 0  # high-priority headroom counted in virtual_usage
    is_integrity_checked: bool = False
    integrity_error: str = ""

    @property
    def num_free_blocks(self) -> int:
        return self.num_total_blocks - self.num_used_blocks

    @property
    def is_idle(self) -> bool:
        return self.num_running == 0 and self.num_waiting == 0 and self.num_used_blocks == 0

    def to_instance_load(self, *, address: str, block_size: int) -> InstanceLoad:
        """The policies' view of this snapshot (block_size comes from the InstanceSpec)."""
        return InstanceLoad(
            instance_id=self.instance_id,
            num_total_blocks=self.num_total_blocks,
            num_used_blocks=self.num_used_blocks,
            num_running=self.num_running,
            num_waiting=self.num_waiting,
            num_hol_blocks=self.num_hol_blocks,
            num_running_high_priority=self.num_running_high_priority,
            is_terminating=self.is_terminating,
            num_migrating=self.num_migrating,
            virtual_usage=self.virtual_usage,
            freeness=self.freeness,
            address=address,
            running=tuple(
                RunningRequest(r.request_id, r.num_tokens, r.num_blocks, r.priority)
                for r in self.running
            ),
            num_waiting_blocks=self.num_waiting_blocks,
            num_headroom_blocks=self.num_headroom_blocks,
            num_preemptions=self.num_preemptions,
            block_size=block_size,
        )

    @classmethod
    def from_instance_load(cls, load: InstanceLoad, seq: int) -> LoadSnapshot:
        """A report from the load model's snapshot (the worker's llumlet)."""
        return cls(
            instance_id=load.instance_id,
            seq=seq,
            num_running=load.num_running,
            num_waiting=load.num_waiting,
            num_total_blocks=load.num_total_blocks,
            num_used_blocks=load.num_used_blocks,
            num_hol_blocks=load.num_hol_blocks,
            num_running_high_priority=load.num_running_high_priority,
            virtual_usage=load.virtual_usage,
            freeness=load.freeness,
            is_terminating=load.is_terminating,
            num_preemptions=load.num_preemptions,
            num_migrating=load.num_migrating,
            running=tuple(RunningRequestSummary(*r) for r in load.running),
            num_waiting_blocks=load.num_waiting_blocks,
            num_headroom_blocks=load.num_headroom_blocks,
        )

    @classmethod
    def empty(cls, instance_id: str, num_total_blocks: int = 0) -> LoadSnapshot:
        """What the scheduler assumes of a freshly registered instance."""
        return cls(
            instance_id=instance_id,
            seq=0,
            num_running=0,
            num_waiting=0,
            num_total_blocks=num_total_blocks,
            num_used_blocks=0,
            freeness=float(num_total_blocks),
        )


@dataclass(frozen=True)
class SamplingSpec:
    """Validated sampling parameters (SamplingParams); the seed is always chosen."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False


@dataclass(frozen=True)
class RequestSpec:
    """Everything a worker needs to run or resume a request (RequestState)."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingSpec
    output_token_ids: tuple[int, ...] = ()  # already delivered (failover resumes after them)
    priority: int = 0
    num_computed_tokens: int = 0
    arrival_time: float = 0.0
    owner_address: str = ""  # gateway OutputSink that receives the tokens
    trace_context: dict[str, str] = field(default_factory=dict)


class OutputDelta(NamedTuple):
    """New tokens of one request from one engine step (RequestOutput).

    A NamedTuple, not a dataclass: one is built per request per step on the worker
    and again on the gateway, so construction cost matters on the token path.
    """

    request_id: str
    first_token_index: int
    token_ids: tuple[int, ...]
    finish_reason: FinishReason = FinishReason.NONE
    error: str = ""
    moved_to_instance_id: str = ""  # set by a migration source: where the request runs now
    moved_to_address: str = ""  # worker address of moved_to_instance_id
    placement_epoch: int = 0  # committed migrations of the request when this was sent

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not FinishReason.NONE
