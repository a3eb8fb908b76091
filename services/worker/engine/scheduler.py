"""The local scheduler: waiting queue, running batch, token budget, preemption.

Torch-free and shared by the real engine and the simulator. vLLM-v1 style: there are no
prefill or decode phases; every step gives each scheduled request a chunk of tokens
[num_computed_tokens, num_computed_tokens + n) so that num_computed_tokens catches up
to num_tokens. When the chunk reaches the end, the executor samples one new token.

One step:
  1. running requests in policy order (oldest / highest priority first) get their
     chunk; when blocks run out, the last request in that order is preempted
     (recompute: blocks freed, back to waiting) until the chunk fits;
  2. if nothing was preempted, waiting requests are admitted in policy order while
     budget, max_num_seqs and free blocks allow (the head blocks the line: FCFS).

schedule_micro_batch is the same for one micro-batch of a pipeline (a KunServe group's
leader): some requests are left out (in flight, or waiting for their KV), and the limits
are the micro-batch's. It is a copy of schedule()'s loop, so the normal step pays
nothing for it.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass, field

from services.worker.engine.block_manager import BlockManager
from services.worker.engine.config import EngineConfig
from services.worker.engine.outputs import RequestOutput
from services.worker.engine.request import FINISH_REASONS, Request, RequestStatus
from services.worker.engine.sampling_params import SamplingParams


@dataclass(frozen=True, slots=True)
class ScheduledRequest:
    """One request's work in a step: compute KV for token_ids at positions
    [num_computed_tokens, num_computed_tokens + len(token_ids))."""

    request_id: str
    token_ids: list[int]
    num_computed_tokens: int
    block_ids: list[int]  # the request's block table; covers every position above
    params: SamplingParams
    is_sampling: bool  # the chunk ends at the request's last token: sample a new one

    @property
    def num_context_tokens(self) -> int:
        """Tokens in KV once this chunk is computed (= position of the sampled token)."""
        return self.num_computed_tokens + len(self.token_ids)


@dataclass
class SchedulerOutput:
    requests: list[ScheduledRequest] = field(default_factory=list)
    preempted_request_ids: list[str] = field(default_factory=list)
    num_batched_tokens: int = 0

    @property
    def is_empty(self) -> bool:
        return not self.requests


class Scheduler:
    def __init__(
        self,
        config: EngineConfig,
        block_manager: BlockManager,
        max_model_len: int,
        eos_token_ids: tuple[int, ...],
    ) -> None:
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.is_priority_policy = config.scheduling_policy == "priority"
        self.block_manager = block_manager
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.requests: dict[str, Request] = {}
        self.waiting: list[Request] = []  # kept sorted by _order
        self.running: list[Request] = []  # suspended requests stay here, unscheduled
        self.num_preemptions = 0
        self.preemption_callbacks: list[Callable[[str], None]] = []

    # ---- queue order ------------------------------------------------------------------

    def _order(self, request: Request) -> tuple:
        """Smaller runs first. FCFS by arrival; the priority policy puts higher priority first."""
        if self.is_priority_policy:
            return (-request.priority, request.arrival_time, request.seq_no)
        return (request.arrival_time, request.seq_no)

    def running_in_policy_order(self) -> list[Request]:
        """The running list, sorted by policy (the order a step schedules it in)."""
        self.running.sort(key=self._order)
        return self.running

    @property
    def max_seq_len(self) -> int:
        """Longest sequence a request may reach: the context, or the whole KV pool."""
        return min(
            self.max_model_len, self.block_manager.num_total_blocks * self.block_manager.block_size
        )

    # ---- adding and removing ----------------------------------------------------------

    def add_waiting(self, request: Request) -> None:
        self.requests[request.request_id] = request
        bisect.insort(self.waiting, request, key=self._order)

    def add_running(self, request: Request) -> None:
        """A request whose blocks the block manager already holds (migration import)."""
        request.set_status(RequestStatus.RUNNING)
        self.requests[request.request_id] = request
        self.running.append(request)

    def finish(self, request: Request, status: RequestStatus) -> None:
        """Takes the request out of the engine for good and frees its blocks."""
        if request.status is RequestStatus.WAITING:
            self.waiting.remove(request)
        else:
            self.running.remove(request)
        request.set_status(status)
        self.block_manager.free(request.request_id)
        del self.requests[request.request_id]

    # ---- one step -----------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        output = SchedulerOutput()
        budget = self.max_num_batched_tokens
        block_manager = self.block_manager
        self.running.sort(key=self._order)

        tables, block_size = block_manager.block_tables, block_manager.block_size
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            if request.status is RequestStatus.SUSPENDED:
                i += 1
                continue
            num_new_tokens = min(request.num_tokens - request.num_computed_tokens, budget)
            assert num_new_tokens > 0, request
            num_tokens = request.num_computed_tokens + num_new_tokens
            table = tables.get(request.request_id)
            # Most decode steps land in the last block's free slots: no block work.
            if table is None or len(table) * block_size < num_tokens:
                while not block_manager.can_append(request.request_id, num_tokens):
                    victim = self._pick_victim(start=i)
                    self.preempt(victim)
                    output.preempted_request_ids.append(victim.request_id)
                    if victim is request:
                        break
                if request.status is RequestStatus.WAITING:  # preempted itself
                    continue
                block_manager.may_append(request.request_id, num_tokens)
            self._add_to_output(output, request, num_new_tokens)
            budget -= num_new_tokens
            i += 1

        if output.preempted_request_ids:
            return output  # memory is short: admit nobody this step
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            num_new_tokens = min(request.num_tokens - request.num_computed_tokens, budget)
            num_tokens = request.num_computed_tokens + num_new_tokens
            if not block_manager.can_allocate(num_tokens):
                break
            block_manager.allocate(request.request_id, num_tokens)
            self.waiting.pop(0)
            request.set_status(RequestStatus.RUNNING)
            self.running.append(request)
            self._add_to_output(output, request, num_new_tokens)
            budget -= num_new_tokens
        return output

    def schedule_micro_batch(
        self, exclude: Container[str], max_num_seqs: int, max_num_batched_tokens: int
    ) -> SchedulerOutput:
        """schedule() for one micro-batch: requests in `exclude` are neither scheduled
        nor preempted; the micro-batch takes at most max_num_seqs requests and
        max_num_batched_tokens tokens. These limits replace the engine's: with k
        micro-batches in flight, a request in one of them excluded from the others,
        up to about k * max_num_seqs requests run (the group's running set), bounded by
        the blocks."""
        output = SchedulerOutput()
        budget = max_num_batched_tokens
        block_manager = self.block_manager
        self.running.sort(key=self._order)

        tables, block_size = block_manager.block_tables, block_manager.block_size
        i = 0
        while i < len(self.running) and budget > 0 and len(output.requests) < max_num_seqs:
            request = self.running[i]
            if request.status is RequestStatus.SUSPENDED or request.request_id in exclude:
                i += 1
                continue
            num_new_tokens = min(request.num_tokens - request.num_computed_tokens, budget)
            assert num_new_tokens > 0, request
            num_tokens = request.num_computed_tokens + num_new_tokens
            table = tables.get(request.request_id)
            if table is None or len(table) * block_size < num_tokens:
                while not block_manager.can_append(request.request_id, num_tokens):
                    victim = self._pick_victim(start=i, exclude=exclude)
                    self.preempt(victim)
                    output.preempted_request_ids.append(victim.request_id)
                    if victim is request:
                        break
                if request.status is RequestStatus.WAITING:  # preempted itself
                    continue
                block_manager.may_append(request.request_id, num_tokens)
            self._add_to_output(output, request, num_new_tokens)
            budget -= num_new_tokens
            i += 1

        if output.preempted_request_ids:
            return output  # memory is short: admit nobody in this micro-batch
        j = 0
        while j < len(self.waiting) and budget > 0 and len(output.requests) < max_num_seqs:
            request = self.waiting[j]
            if request.request_id in exclude:
                j += 1
                continue
            num_new_tokens = min(request.num_tokens - request.num_computed_tokens, budget)
            num_tokens = request.num_computed_tokens + num_new_tokens
            if not block_manager.can_allocate(num_tokens):
                break
            block_manager.allocate(request.request_id, num_tokens)
            self.waiting.pop(j)
            request.set_status(RequestStatus.RUNNING)
            self.running.append(request)
            self._add_to_output(output, request, num_new_tokens)
            budget -= num_new_tokens
        return output

    def schedule_planned(
        self, plan: Sequence[tuple[str, int]], exclude: Container[str]
    ) -> SchedulerOutput:
        """A micro-batch whose requests and chunk sizes a former chose (running requests
        first, then waiting ones in policy order): [(request_id, num_new_tokens)]. The
        blocks work as in schedule_micro_batch: a running request short of blocks
        preempts the last running one in policy order that is neither in `exclude`
        nor already in this micro-batch (planned ones after it drop out if preempted);
        waiting ones are admitted in order until one cannot be allocated, and none after
        a preemption."""
        output = SchedulerOutput()
        block_manager = self.block_manager
        self.running.sort(key=self._order)
        scheduled: set[str] = set()
        is_admitting = True
        for request_id, num_new_tokens in plan:
            request = self.requests[request_id]
            if request_id in output.preempted_request_ids:
                continue  # a victim of an earlier request of this plan
            num_tokens = request.num_computed_tokens + num_new_tokens
            assert num_new_tokens > 0 and num_tokens <= request.num_tokens, (
                request,
                num_new_tokens,
            )
            if request.status is RequestStatus.RUNNING:
                while not block_manager.can_append(request_id, num_tokens):
                    victim = self._pick_planned_victim(exclude, scheduled)
                    self.preempt(victim)
                    output.preempted_request_ids.append(victim.request_id)
                    if victim is request:
                        break
                if request.status is not RequestStatus.RUNNING:  # preempted itself
                    continue
                block_manager.may_append(request_id, num_tokens)
            elif request.status is RequestStatus.WAITING:
                if not is_admitting or output.preempted_request_ids:
                    break
                if not block_manager.can_allocate(num_tokens):
                    is_admitting = False
                    break
                block_manager.allocate(request_id, num_tokens)
                self.waiting.remove(request)
                request.set_status(RequestStatus.RUNNING)
                self.running.append(request)
            else:
                continue  # suspended
            self._add_to_output(output, request, num_new_tokens)
            scheduled.add(request_id)
        return output

    def _pick_planned_victim(self, exclude: Container[str], scheduled: set[str]) -> Request:
        for request in reversed(self.running):
            if (
                request.status is RequestStatus.RUNNING
                and request.request_id not in exclude
                and request.request_id not in scheduled
            ):
                return request
        raise AssertionError("the request being scheduled is always a candidate")

    def _pick_victim(self, start: int, exclude: Container[str] = frozenset()) -> Request:
        """The last request in policy order that is not yet scheduled this step (nor
        excluded from it)."""
        for request in reversed(self.running[start:]):
            if request.status is RequestStatus.RUNNING and request.request_id not in exclude:
                return request
        raise AssertionError("the request being scheduled is always a candidate")

    def preempt(self, request: Request) -> None:
        """Preemption by recompute: the request drops its KV and queues again."""
        self.running.remove(request)
        self.block_manager.free(request.request_id)
        request.set_status(RequestStatus.WAITING)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        bisect.insort(self.waiting, request, key=self._order)
        for callback in self.preemption_callbacks:
            callback(request.request_id)

    def _add_to_output(
        self, output: SchedulerOutput, request: Request, num_new_tokens: int
    ) -> None:
        start = request.num_computed_tokens
        end = start + num_new_tokens
        all_token_ids = request.all_token_ids
        # Positional arguments: this runs once per request per step (the simulator's hot path).
        output.requests.append(
            ScheduledRequest(
                request.request_id,  # request_id
                all_token_ids[start:end],  # token_ids
                start,  # num_computed_tokens
                self.block_manager.block_ids(request.request_id),  # block_ids
                request.params,  # params
                end == len(all_token_ids),  # is_sampling
            )
        )
        output.num_batched_tokens += num_new_tokens

    def update_from_output(
        self, output: SchedulerOutput, sampled_token_ids: list[int]
    ) -> list[RequestOutput]:
        """Advances num_computed_tokens, appends sampled tokens (one per sampling request,
        in order) and finishes requests that hit a stop condition."""
        results: list[RequestOutput] = []
        sampled = iter(sampled_token_ids)
        requests = self.requests
        max_seq_len = self.max_seq_len  # finishing frees blocks but never resizes the pool
        for scheduled in output.requests:
            token_id = next(sampled) if scheduled.is_sampling else None
            request = requests.get(scheduled.request_id)
            if request is None or request.status is not RequestStatus.RUNNING:
                continue  # aborted or moved while the step ran
            request.num_computed_tokens += len(scheduled.token_ids)
            if token_id is None:
                continue
            request.append_output_token(token_id)
            status = self._stop_status(request, token_id, max_seq_len)
            if status is not None:
                self.finish(request, status)
            # RequestOutput(request_id, new_token_ids, first_token_index, finished, finish_reason)
            results.append(
                RequestOutput(
                    request.request_id,
                    [token_id],
                    len(request.output_token_ids) - 1,
                    status is not None,
                    FINISH_REASONS[status] if status is not None else None,
                )
            )
        return results

    def _stop_status(
        self, request: Request, token_id: int, max_seq_len: int
    ) -> RequestStatus | None:
        params = request.params
        if not params.ignore_eos and token_id in self.eos_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if token_id in params.stop_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if (
            len(request.output_token_ids) >= params.max_tokens
            or len(request.all_token_ids) >= max_seq_len
        ):
            return RequestStatus.FINISHED_LENGTH
        return None
