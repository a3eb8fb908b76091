"""A request inside the engine, its status machine, and its portable state (migration)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from services.worker.engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    """Where a request is. Allowed transitions are in ALLOWED_TRANSITIONS below.

    WAITING    queued; holds no blocks (new, or preempted: its KV is recomputed later)
    RUNNING    in the running batch; holds blocks; scheduled every step
    SUSPENDED  in the running batch with its blocks, but not scheduled (stop-and-copy
               phase of a live migration)
    FINISHED_* done here for good; blocks freed
    MIGRATED   handed to another engine by remove_request; blocks freed, no output
    """

    WAITING = "waiting"
    RUNNING = "running"
    SUSPENDED = "suspended"
    FINISHED_STOPPED = "finished_stopped"  # EOS or a stop token id
    FINISHED_LENGTH = "finished_length"  # max_tokens, or the context / KV pool limit
    FINISHED_ABORTED = "finished_aborted"  # abort_request
    MIGRATED = "migrated"

    @property
    def is_finished(self) -> bool:
        return self in _FINISHED


_FINISHED = frozenset(
    {
        RequestStatus.FINISHED_STOPPED,
        RequestStatus.FINISHED_LENGTH,
        RequestStatus.FINISHED_ABORTED,
        RequestStatus.MIGRATED,
    }
)

ALLOWED_TRANSITIONS: dict[RequestStatus, frozenset[RequestStatus]] = {
    # scheduled | aborted | migrated while queued
    RequestStatus.WAITING: frozenset(
        {RequestStatus.RUNNING, RequestStatus.FINISHED_ABORTED, RequestStatus.MIGRATED}
    ),
    # preempted | suspended | finished | migrated
    RequestStatus.RUNNING: frozenset(
        {
            RequestStatus.WAITING,
            RequestStatus.SUSPENDED,
            RequestStatus.FINISHED_STOPPED,
            RequestStatus.FINISHED_LENGTH,
            RequestStatus.FINISHED_ABORTED,
            RequestStatus.MIGRATED,
        }
    ),
    # resumed (migration aborted) | aborted | migrated (migration committed)
    RequestStatus.SUSPENDED: frozenset(
        {RequestStatus.RUNNING, RequestStatus.FINISHED_ABORTED, RequestStatus.MIGRATED}
    ),
    RequestStatus.FINISHED_STOPPED: frozenset(),
    RequestStatus.FINISHED_LENGTH: frozenset(),
    RequestStatus.FINISHED_ABORTED: frozenset(),
    RequestStatus.MIGRATED: frozenset(),
}

FINISH_REASONS: dict[RequestStatus, str] = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


class Request:
    """Token state of one request. `num_computed_tokens` catches up to `num_tokens`:
    a new request starts at 0, a decoding one is at num_tokens - 1 (the last sampled
    token is not fed yet), a preempted one drops back to 0, and a migrated-in one
    arrives with its KV already computed."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        priority: int,
        arrival_time: float,
        seq_no: int,
        output_token_ids: list[int] | None = None,
        num_computed_tokens: int = 0,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids = list(output_token_ids or [])
        self.all_token_ids = self.prompt_token_ids + self.output_token_ids
        self.params = params
        self.priority = priority  # higher runs first under the "priority" policy; > 0 = high
        self.arrival_time = arrival_time
        self.seq_no = seq_no  # admission order in this engine: FCFS tie-breaker
        self.num_computed_tokens = num_computed_tokens
        self.status = RequestStatus.WAITING
        self.num_preemptions = 0

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def set_status(self, status: RequestStatus) -> None:
        if status not in ALLOWED_TRANSITIONS[self.status]:
            raise AssertionError(
                f"request {self.request_id!r}: {self.status.name} -> {status.name}"
            )
        self.status = status

    def to_state(self) -> RequestState:
        return RequestState(
            request_id=self.request_id,
            prompt_token_ids=tuple(self.prompt_token_ids),
            output_token_ids=tuple(self.output_token_ids),
            params=self.params,
            priority=self.priority,
            num_computed_tokens=self.num_computed_tokens,
            arrival_time=self.arrival_time,
        )

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, {self.status.name}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens})"
        )


@dataclass(frozen=True)
class RequestState:
    """Everything another engine needs to continue a request (besides its KV blocks).

    The sampling seed inside `params` is always set (the engine draws one at admission
    when the caller gave none), so the continuation is identical after a move.
    """

    request_id: str
    prompt_token_ids: tuple[int, ...]
    output_token_ids: tuple[int, ...]
    params: SamplingParams
    priority: int
    num_computed_tokens: int  # tokens whose KV is in the blocks that travel with the state
    arrival_time: float

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)
