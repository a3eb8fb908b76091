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

from services.policies import InstanceLoad


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
    transport_address: bytes = b""  # data-plane (kvtransport) address; empty: no data plane
    transport_backend: str = ""
    kernels: str = ""  # the engine's kernel backend, "native" or "torch" ("" = not reported)


@dataclass(frozen=True)
class LoadReport:
    """One load report of one instance (LoadReport): its load snapshot, numbered.

    `seq` grows per worker process so the scheduler never lets a late report overwrite
    a newer one. The integrity fields are filled only when a caller asked the worker to
    check its engine (Worker.GetLoad with check_integrity).
    """

    load: InstanceLoad
    seq: int
    is_integrity_checked: bool = False
    integrity_error: str = ""
    # Layers held now, [layer_start, layer_end); (0, 0) when not reported. A KunServe
    # member holds only its stage's range and has freed the rest of its weights.
    layer_start: int = 0
    layer_end: int = 0
    freed_weight_bytes: int = 0
    # Requests that reached the instance since its previous report: the report counts
    # them (as waiting until its engine shows them), so they are no longer pending.
    arrived_request_ids: tuple[str, ...] = ()


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
