"""KunServe's group as one pipeline: the layer split, the group's block pool, and the
micro-batches every member runs (`engine.pipeline`).

g members of one model split its L layers (stage 0 keeps the embedding, stage g-1 the
final norm and lm_head); when g does not divide L the first L mod g stages take one
layer more:

    services.policies.groups.split_layers(4, 2)  ->  [(0, 2), (2, 4)]
    services.policies.groups.split_layers(6, 4)  ->  [(0, 2), (2, 4), (4, 5), (5, 6)]

Block ids are the group's, valid on every member: each member's pool has
num_group_blocks blocks, a block holding that member's layers only. Member r's blocks
from before the drop keep their place at offset_r + old id (plan_group_pool):

    group id   0 ...... N0-1 | N0 ...... N0+N1-1 | ... | sum(N) ... num_group_blocks-1
    held       member 0's    | member 1's        | ... | free: new requests, growth
    offset     0             | N0                | ... |

Stage 0 (the leader) schedules for the whole group; every stage executes what it
scheduled, in the order it was scheduled; the last stage samples:

    leader     batch = schedule_micro_batch(exclude, max_num_seqs, max_num_batched_tokens)
    stage 0    hidden = execute_stage(batch).hidden_states                  ──┐
    stage r    hidden = execute_stage(batch, hidden).hidden_states           <─┘ ... ─┐
    stage g-1  sampled = execute_stage(batch, hidden).sampled_token_ids     <─────────┘
    leader     outputs = apply_micro_batch(batch, sampled)

Several micro-batches are in flight at once: a request in one is left out of the next
ones until it is applied (its tokens are not known yet). How the work is cut into
micro-batches (simple, or lookahead: balanced by the cost model) is micro_batching.py's.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from services.worker.engine.errors import (
    GroupCapacityError,
    InvalidMicroBatchError,
)
from services.worker.engine.executor import Executor, ExecutorOutput
from services.worker.engine.micro_batching import (
    STARVED_AFTER_ROUNDS,
    Candidate,
    MicroBatchFormation,
    plan_lookahead,
)
from services.worker.engine.outputs import RequestOutput
from services.worker.engine.request import RequestStatus
from services.worker.engine.scheduler import Scheduler, SchedulerOutput


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class GroupPool:
    """The block pool of a group: the same num_group_blocks on every member."""

    num_group_blocks: int  # blocks of every member's pool: group ids 0..num_group_blocks-1
    block_offsets: tuple[int, ...]  # member r's old block i is group block block_offsets[r] + i

    def group_block_ids(self, member: int, block_ids: Iterable[int]) -> list[int]:
        """Member `member`'s old block ids as group ids."""
        offset = self.block_offsets[member]
        return [offset + block_id for block_id in block_ids]


def plan_group_pool(
    num_member_blocks: Sequence[int], member_capacities: Sequence[int]
) -> GroupPool:
    """The pool of a group whose member r had num_member_blocks[r] blocks before the
    drop and can hold member_capacities[r] blocks after it (LayerRanges.group_capacity):
    as many blocks as the smallest capacity, member r's at offset sum(N_0..N_r-1)."""
    if len(num_member_blocks) != len(member_capacities) or not num_member_blocks:
        raise GroupCapacityError(
            f"one pool size and one capacity per member, got {len(num_member_blocks)} "
            f"and {len(member_capacities)}"
        )
    offsets, offset = [], 0
    for num_blocks in num_member_blocks:
        offsets.append(offset)
        offset += num_blocks
    num_group_blocks = min(member_capacities)
    if num_group_blocks < offset:
        raise GroupCapacityError(
            f"the group can hold {num_group_blocks} blocks (capacities "
            f"{list(member_capacities)}), fewer than its members' {offset} "
            f"({list(num_member_blocks)}): their block ids would collide"
        )
    return GroupPool(num_group_blocks, tuple(offsets))


class Pipeline:
    """The engine as a pipeline stage (`engine.pipeline`), over its scheduler and
    executor. On the leader it forms micro-batches and applies their sampled tokens;
    on every stage it executes a micro-batch on the layers held. It tracks the
    micro-batches in flight (scheduled, not applied yet): their requests are left out
    of later micro-batches.

    pending_outputs is the engine's list of outputs not tied to a step (aborts): applying
    a micro-batch hands them out, as LLMEngine.step() does."""

    def __init__(
        self, scheduler: Scheduler, executor: Executor, pending_outputs: list[RequestOutput]
    ) -> None:
        self.scheduler = scheduler
        self.executor = executor
        self.pending_outputs = pending_outputs
        self._in_flight: list[SchedulerOutput] = []
        self._in_flight_ids: set[str] = set()
        # The lookahead formation takes the requests back the longest first: number of
        # the apply that brought each back (absent: never in flight, first of all).
        self._num_applied = 0
        self._back_since: dict[str, int] = {}
        # Prompts the lookahead formation left out of consecutive micro-batches (by how
        # many); after a whole round of them a prompt is starved (Candidate.is_starved).
        self._passed_over: dict[str, int] = {}

    @property
    def num_in_flight(self) -> int:
        """Micro-batches scheduled and not applied yet."""
        return len(self._in_flight)

    @property
    def in_flight_request_ids(self) -> frozenset[str]:
        return frozenset(self._in_flight_ids)

    def schedule_micro_batch(
        self,
        exclude: Iterable[str] = (),
        max_num_seqs: int | None = None,
        max_num_batched_tokens: int | None = None,
    ) -> SchedulerOutput:
        """The next micro-batch (leader): like LLMEngine.step()'s schedule, but requests
        in flight or in `exclude` (waiting for their KV exchange) are neither scheduled
        nor preempted; at most max_num_seqs requests and max_num_batched_tokens tokens
        (default: the engine's). Empty when nothing can run."""
        scheduler = self.scheduler
        max_num_seqs = scheduler.max_num_seqs if max_num_seqs is None else max_num_seqs
        if max_num_batched_tokens is None:
            max_num_batched_tokens = scheduler.max_num_batched_tokens
        for name, value in (
            ("max_num_seqs", max_num_seqs),
            ("max_num_batched_tokens", max_num_batched_tokens),
        ):
            if not _is_int(value) or value <= 0:
                raise InvalidMicroBatchError(f"{name} must be an int > 0, got {value!r}")
        excluded = self._in_flight_ids.union(exclude)
        batch = scheduler.schedule_micro_batch(excluded, max_num_seqs, max_num_batched_tokens)
        self._track(batch)
        return batch

    def form_micro_batch(
        self, formation: MicroBatchFormation, exclude: Iterable[str] = ()
    ) -> SchedulerOutput:
        """The next micro-batch of `formation` (leader): simple (schedule_micro_batch
        with 1/M of the limits) or lookahead (schedule_lookahead_micro_batch)."""
        if formation.name == "simple":
            m = formation.num_micro_batches
            return self.schedule_micro_batch(
                exclude,
                max(1, formation.max_num_seqs // m),
                max(1, formation.max_num_batched_tokens // m),
            )
        return self.schedule_lookahead_micro_batch(formation, exclude)

    def schedule_lookahead_micro_batch(
        self, formation: MicroBatchFormation, exclude: Iterable[str] = ()
    ) -> SchedulerOutput:
        """The next micro-batch, of the cost the round ahead spreads evenly
        (micro_batching.plan_lookahead): the micro-batches in flight and this one hold
        at most formation.max_num_seqs requests and max_num_batched_tokens tokens
        together. Same exclusions as schedule_micro_batch."""
        assert formation.cost is not None
        scheduler = self.scheduler
        excluded = self._in_flight_ids.union(exclude)
        requests = scheduler.requests
        returning: list[Candidate] = []
        num_seqs_out = num_tokens_out = 0
        for batch in self._in_flight:
            num_seqs_out += len(batch.requests)
            num_tokens_out += batch.num_batched_tokens
            for r in batch.requests:
                request = requests.get(r.request_id)
                if request is None:
                    continue
                num_remaining = request.num_tokens - r.num_context_tokens + int(r.is_sampling)
                if r.is_sampling and len(request.output_token_ids) + 1 >= request.params.max_tokens:
                    continue  # its last token: it finishes when it comes back
                if num_remaining > 0:
                    returning.append(Candidate(r.request_id, r.num_context_tokens, num_remaining))
        running = [
            r
            for r in scheduler.running_in_policy_order()
            if r.request_id not in excluded and r.status is not RequestStatus.SUSPENDED
        ]
        # Back the longest first (stable: policy order among equals); priorities first.
        is_priority = scheduler.is_priority_policy
        running.sort(
            key=lambda r: (
                -r.priority if is_priority else 0,
                self._back_since.get(r.request_id, -1),
            )
        )
        starved_after = formation.num_micro_batches * STARVED_AFTER_ROUNDS
        passed_over = self._passed_over
        available = [
            Candidate(
                r.request_id,
                r.num_computed_tokens,
                r.num_tokens - r.num_computed_tokens,
                is_starved=passed_over.get(r.request_id, 0) >= starved_after,
            )
            for r in running
        ]
        num_seqs_left = formation.max_num_seqs - num_seqs_out
        room = num_seqs_left - len(available)  # lookahead: the waiting ones that may join
        for r in scheduler.waiting:
            if room <= 0:
                break
            if r.request_id in excluded:
                continue
            available.append(
                Candidate(
                    r.request_id,
                    r.num_computed_tokens,
                    r.num_tokens - r.num_computed_tokens,
                    is_waiting=True,
                    is_starved=passed_over.get(r.request_id, 0) >= starved_after,
                )
            )
            room -= 1
        plan = plan_lookahead(
            available,
            returning,
            formation.cost,
            formation.num_micro_batches,
            round_max_tokens=formation.max_num_batched_tokens,
            max_num_seqs=num_seqs_left,
            max_num_batched_tokens=formation.max_num_batched_tokens - num_tokens_out,
            min_chunk_tokens=formation.min_chunk_tokens,
        )
        batch = scheduler.schedule_planned(plan, excluded)
        self._track(batch)
        # Only the prompts offered and left out carry their count on (a decode is never
        # cut; a request gone or in flight drops out).
        planned = {request_id for request_id, _ in plan}
        self._passed_over = {
            c.request_id: passed_over.get(c.request_id, 0) + 1
            for c in available
            if c.num_remaining_tokens > 1 and c.request_id not in planned
        }
        return batch

    def _track(self, batch: SchedulerOutput) -> None:
        if not batch.is_empty:
            self._in_flight.append(batch)
            self._in_flight_ids.update(r.request_id for r in batch.requests)

    def execute_stage(
        self, batch: SchedulerOutput, hidden_states: torch.Tensor | None = None
    ) -> ExecutorOutput:
        """Runs this engine's layers on a micro-batch the leader scheduled: from its
        tokens on the first stage, else from the previous stage's hidden states (rows in
        executor.batch_row_order). The last stage returns the sampled token ids."""
        return self.executor.execute(batch, hidden_states)

    def apply_micro_batch(
        self, batch: SchedulerOutput, sampled_token_ids: list[int]
    ) -> list[RequestOutput]:
        """The leader's update for a micro-batch the last stage sampled: its requests
        advance (those aborted or finished meanwhile are skipped) and may run again.
        Returns the pending outputs (aborts), then the micro-batch's."""
        index = next((i for i, b in enumerate(self._in_flight) if b is batch), None)
        if index is None:
            raise InvalidMicroBatchError("this micro-batch is not in flight")
        num_sampling = sum(1 for r in batch.requests if r.is_sampling)
        if len(sampled_token_ids) != num_sampling:
            raise InvalidMicroBatchError(
                f"{len(sampled_token_ids)} sampled tokens for {num_sampling} sampling requests"
            )
        del self._in_flight[index]
        self._in_flight_ids.difference_update(r.request_id for r in batch.requests)
        self._num_applied += 1
        for r in batch.requests:
            self._back_since[r.request_id] = self._num_applied
        if len(self._back_since) > 2 * len(self.scheduler.requests) + 64:
            live = self.scheduler.requests
            self._back_since = {k: v for k, v in self._back_since.items() if k in live}
        return self.take_outputs() + self.scheduler.update_from_output(batch, sampled_token_ids)

    def take_outputs(self) -> list[RequestOutput]:
        """The pending outputs (aborts), for a leader with nothing in flight to apply."""
        outputs = self.pending_outputs.copy()
        self.pending_outputs.clear()
        return outputs

    def discard_in_flight(self) -> list[str]:
        """Forgets every micro-batch in flight without applying it (a stage is gone):
        their requests did not advance and will compute those tokens again. Returns
        their ids."""
        request_ids = [r.request_id for batch in self._in_flight for r in batch.requests]
        self._in_flight.clear()
        self._in_flight_ids.clear()
        return request_ids
