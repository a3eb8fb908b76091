"""What the engine hands back: per-request outputs, load stats, per-step info."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestOutput:
    """New tokens of one request from one step (one token per step while decoding)."""

    request_id: str
    new_token_ids: list[int]
    first_token_index: int  # index in the request's output of new_token_ids[0]
    finished: bool
    finish_reason: str | None  # "length" | "stop" | "abort" when finished


@dataclass(frozen=True)
class RequestView:
    """Light view of a running (or suspended) request for load reports and migration choice."""

    request_id: str
    num_tokens: int
    num_blocks: int
    priority: int
    num_output_tokens: int
    is_suspended: bool


@dataclass(frozen=True)
class EngineStats:
    """Load snapshot of one engine (inputs to Llumnix's virtual usage)."""

    num_running: int  # in the running batch, suspended ones included
    num_waiting: int
    num_total_blocks: int
    num_free_blocks: int
    num_used_blocks: int  # request-owned + reserved
    num_hol_blocks: int  # blocks the head-of-line waiting request needs for all its tokens
    num_running_high_priority: int  # running with priority > 0
    num_preemptions: int  # cumulative
    num_reserved_blocks: int
    num_suspended: int


@dataclass
class StepInfo:
    """What the last step did; elapsed_s is wall time (torch) or simulated (cost model)."""

    num_scheduled_requests: int = 0
    num_batched_tokens: int = 0
    num_prefill_tokens: int = 0  # tokens of chunks longer than one token
    num_decode_requests: int = 0
    preempted_request_ids: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    # Requests whose first computation (prefill from token 0) this step began: their
    # queueing ended here (tracing's queue / prefill split).
    started_request_ids: list[str] = field(default_factory=list)
    # The batch's cost-model features (cost_model.batch_features: 1, tokens, requests,
    # context tokens, attention pairs): what a step log compares its time against.
    features: tuple[float, ...] = ()
