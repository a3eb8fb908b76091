"""A KunServe group in one process: g engines drop to one layer range each, serve as one
pipeline, and restore; every request gets exactly the tokens one unpipelined engine
gives it alone.

The harness stands in for the worker-level code (services/worker/kunserve/): Python
queues for the links between stages, dicts of tensors for the KV exchange.

    phase 1   every member runs its own requests (decoding, half-prefilled, waiting)
    drop      members export their requests (+ the KV of layers others will keep),
              join the group; the leader adopts them at group ids; each request is
              held back until its KV slices reach their owners
    pipeline  up to g micro-batches in flight, formed simple or lookahead (balanced
              by the cost model); new requests arrive
    restore   drain; each running request gets a home (or recomputes); KV slices move
              to the homes; members leave the group; requests continue unpipelined
"""

from __future__ import annotations

import dataclasses
from collections import deque

import pytest
import torch

from services.policies.groups import split_layers
from services.worker.engine import (
    EngineStateError,
    GroupPool,
    LLMEngine,
    MicroBatchCost,
    MicroBatchFormation,
    RequestState,
    RequestStatus,
    SamplingParams,
    plan_group_pool,
)
from services.worker.engine.cost_model import TINY_CPU
from tests.unit.worker.engine.helpers import collect, random_prompts, weight_digest

BLOCK_SIZE = 8
MEMBER_CONFIG = {
    "block_size": BLOCK_SIZE,
    "num_kv_blocks": 28,
    "max_num_batched_tokens": 64,
    "max_num_seqs": 16,
}
# Phase 1 per member: a (20 tokens) and b (10) decode after two steps of 64 tokens,
# c (120) is part prefilled (96 tokens), d (15) still waits.
PHASE_1_PROMPT_LENGTHS = {"a": 20, "b": 10, "c": 120, "d": 15}
NEW_PROMPT_LENGTHS = [12, 40, 25, 60, 33, 18]  # arriving during the pipeline


def _params(index: int, max_tokens: int) -> SamplingParams:
    if index % 2 == 0:
        return SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return SamplingParams(
        max_tokens=max_tokens, temperature=0.9, top_k=50, seed=1000 + index, ignore_eos=True
    )


@dataclasses.dataclass
class Job:
    request_id: str
    prompt: list[int]
    params: SamplingParams


class Group:
    """g members run as one pipeline; members[0] (the leader) schedules."""

    def __init__(self, members: list[LLMEngine], formation: str = "simple") -> None:
        self.members = members
        self.g = len(members)
        config = members[0].config
        self.formation = MicroBatchFormation(
            formation,
            num_micro_batches=self.g,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            cost=MicroBatchCost.from_profile(TINY_CPU),
            min_chunk_tokens=8,
        )
        self.ranges = split_layers(members[0].model_config.num_layers, self.g)
        self.links: list[deque] = [deque() for _ in range(self.g)]  # micro-batches per stage
        self.waiting_for_kv: set[str] = set()
        self.pending_kv: dict[str, list[tuple[int, list[int], torch.Tensor]]] = {}
        self.tokens: dict[str, list[int]] = {}
        self.pool: GroupPool | None = None

    @property
    def leader(self) -> LLMEngine:
        return self.members[0]

    # ---- drop -----------------------------------------------------------------------

    def drop(self, keep_host_copy: tuple[int, ...] = ()) -> GroupPool:
        capacities = [
            m.layer_ranges.group_capacity(*self.ranges[r]) for r, m in enumerate(self.members)
        ]
        pool = plan_group_pool([m.block_manager.num_total_blocks for m in self.members], capacities)
        exported: list[list[tuple[RequestState, list[int]]]] = []
        for r, member in enumerate(self.members):
            mine = []
            order = member.scheduler.running + member.scheduler.waiting
            for request_id in [request.request_id for request in order]:
                blocks = member.migration.request_block_ids(request_id)
                for s, (start, end) in enumerate(self.ranges):  # the network's stand-in
                    if s != r and blocks:
                        data = member.migration.read_kv_layers(blocks, start, end)
                        group_ids = pool.group_block_ids(r, blocks)
                        self.pending_kv.setdefault(request_id, []).append((s, group_ids, data))
                mine.append((member.migration.remove_request(request_id), blocks))
            assert not member.has_unfinished_requests()
            exported.append(mine)
        for r, member in enumerate(self.members):
            change = member.layer_ranges.join_group(
                *self.ranges[r],
                pool.num_group_blocks,
                pool.block_offsets[r],
                keep_host_copy=r in keep_host_copy,
            )
            assert (change.layer_start, change.layer_end) == self.ranges[r]
            assert change.num_total_blocks_after == pool.num_group_blocks
        for r, mine in enumerate(exported):
            for state, blocks in mine:
                self.leader.migration.import_request_at(state, pool.group_block_ids(r, blocks))
        self.waiting_for_kv = set(self.pending_kv)
        self.pool = pool
        return pool

    def exchange(self, request_id: str) -> None:
        """Writes one request's KV slices into their owners' pools (its KV exchange)."""
        for s, group_ids, data in self.pending_kv.pop(request_id):
            self.members[s].migration.write_kv_blocks(group_ids, data)
        self.waiting_for_kv.discard(request_id)

    # ---- pipeline -------------------------------------------------------------------

    def tick(self, schedule: bool = True) -> list[str]:
        """Every stage runs its next micro-batch (last stage first, so each moves one
        stage a tick); then the leader schedules one if fewer than g are in flight.
        Returns the request ids scheduled."""
        for r in reversed(range(self.g)):
            if not self.links[r]:
                continue
            batch, hidden = self.links[r].popleft()
            out = self.members[r].pipeline.execute_stage(batch, hidden)
            if r + 1 < self.g:
                assert out.hidden_states is not None and not out.sampled_token_ids
                self.links[r + 1].append((batch, out.hidden_states))
            else:
                outputs = self.leader.pipeline.apply_micro_batch(batch, out.sampled_token_ids)
                assert not {o.request_id for o in outputs} & self.waiting_for_kv
                collect(outputs, self.tokens)
        if not schedule or self.leader.pipeline.num_in_flight >= self.g:
            return []
        batch = self.leader.pipeline.form_micro_batch(self.formation, self.waiting_for_kv)
        if batch.is_empty:
            return []
        self.links[0].append((batch, None))
        return [r.request_id for r in batch.requests]

    def drain(self) -> None:
        while self.leader.pipeline.num_in_flight:
            self.tick(schedule=False)
        assert not any(self.links)

    # ---- restore --------------------------------------------------------------------

    def restore(self, weights_from: str) -> tuple[int, int]:
        """Leaves the group; returns (requests moved with their KV, requests recomputed)."""
        assert not self.waiting_for_kv and self.leader.pipeline.num_in_flight == 0
        leader = self.leader
        order = leader.scheduler.running + leader.scheduler.waiting
        free = [m.layer_ranges.num_blocks_complete for m in self.members]
        block_maps: list[dict[int, int]] = [{} for _ in self.members]
        homed: list[tuple[int, RequestState, list[int]]] = []  # (home, state, local ids)
        moved: dict[tuple[str, int], torch.Tensor] = {}
        num_moved = num_recomputed = 0
        for i, request_id in enumerate([request.request_id for request in order]):
            group_ids = leader.migration.request_block_ids(request_id)
            state = leader.migration.remove_request(request_id)
            home = max(range(self.g), key=lambda m: free[m])
            if group_ids and free[home] < len(group_ids):  # does not fit anywhere
                state = dataclasses.replace(state, num_computed_tokens=0)
                group_ids = []
                num_recomputed += 1
            elif not group_ids:
                home = i % self.g
            local_ids = []
            if group_ids:
                num_moved += 1
                first = self.members[home].layer_ranges.num_blocks_complete - free[home]
                local_ids = list(range(first, first + len(group_ids)))
                free[home] -= len(group_ids)
                block_maps[home].update(zip(group_ids, local_ids, strict=True))
                for s, member in enumerate(self.members):
                    if s != home:  # read before the owner leaves the group
                        moved[(request_id, s)] = member.migration.read_kv_blocks(group_ids)
            homed.append((home, state, local_ids))
        peer_weights: list[dict[str, torch.Tensor] | None] = [None] * self.g
        if weights_from == "peers":
            for r in range(self.g):
                peer_weights[r] = {
                    name: tensor
                    for s, member in enumerate(self.members)
                    if s != r
                    for name, tensor in member.layer_ranges.export_weights().items()
                }
        for r, member in enumerate(self.members):
            change = member.layer_ranges.leave_group(block_maps[r], peer_weights[r])
            assert (change.layer_start, change.layer_end) == (0, member.model_config.num_layers)
        for home, state, local_ids in homed:
            member = self.members[home]
            member.migration.import_request_at(state, local_ids)
            for s, (start, _) in enumerate(self.ranges):
                if s != home and local_ids:
                    member.migration.write_kv_blocks(
                        local_ids, moved[(state.request_id, s)], layer_start=start
                    )
        return num_moved, num_recomputed


def reference_tokens(make_engine, kernels: str, jobs: list[Job]) -> dict[str, list[int]]:
    """Each request alone on one unpipelined engine."""
    reference = make_engine(kernels=kernels, block_size=BLOCK_SIZE, num_kv_blocks=64)
    return {
        job.request_id: reference.generate([job.prompt], job.params)[0].new_token_ids
        for job in jobs
    }


# (requests moved home with their KV, requests recomputed) at the restore, per g: the
# group ran more than the members' pools of 28 blocks hold again.
# The formation changes which requests run when, hence the pool at the restore.
RESTORED = {
    ("simple", 2): (8, 6),
    ("simple", 4): (19, 2),
    ("lookahead", 2): (8, 6),
    ("lookahead", 4): (17, 3),
}


@pytest.mark.parametrize("formation", ["simple", "lookahead"])
@pytest.mark.parametrize("kernels", ["torch", "native"])
@pytest.mark.parametrize("g", [2, 4])
def test_a_group_serves_exactly_what_one_engine_serves(make_engine, g, kernels, formation):
    members = [make_engine(kernels=kernels, **MEMBER_CONFIG) for _ in range(g)]
    digests = [weight_digest(m) for m in members]
    jobs: list[Job] = []
    group = Group(members, formation)

    def arrive(engine: LLMEngine, request_id: str, length: int, seed: int, arrival: float):
        job = Job(request_id, random_prompts(seed, 1, length, length)[0], _params(seed, 16))
        jobs.append(job)
        engine.add_request(job.request_id, job.prompt, job.params, arrival_time=arrival)

    # Phase 1: each member on its own.
    for r, member in enumerate(members):
        for k, (name, length) in enumerate(PHASE_1_PROMPT_LENGTHS.items()):
            prompt = random_prompts(100 * r + k, 1, length, length)[0]
            job = Job(f"m{r}-{name}", prompt, _params(k + r, max_tokens=14))
            jobs.append(job)
            member.add_request(job.request_id, job.prompt, job.params, arrival_time=float(k))
        for _ in range(2):
            collect(member.step(), group.tokens)
        assert [len(group.tokens[f"m{r}-{n}"]) for n in "ab"] == [2, 2]
        assert member.scheduler.requests[f"m{r}-c"].num_computed_tokens == 96  # of 120
        assert member.request_status(f"m{r}-d") is RequestStatus.WAITING

    # Drop. Member g-1 keeps a host copy of what it drops (its restore reads it back).
    pool = group.drop(keep_host_copy=(g - 1,))
    leader = group.leader
    assert pool.block_offsets == tuple(28 * r for r in range(g))
    assert leader.block_manager.num_total_blocks == pool.num_group_blocks
    # Member g-1's c held blocks 5..16 (after a's 0..2 and b's 3..4): now at offset 28 (g-1).
    offset = 28 * (g - 1)
    assert leader.block_manager.block_ids(f"m{g - 1}-c") == list(range(offset + 5, offset + 17))
    for member in members[1:]:
        assert not member.scheduler.requests
        assert member.block_manager.num_free_blocks == pool.num_group_blocks
    # The running requests wait for their KV; the waiting ones need none.
    assert group.waiting_for_kv == {f"m{r}-{n}" for r in range(g) for n in "abc"}
    with pytest.raises(EngineStateError, match="holds layers"):
        leader.step()

    # Pipeline. An exchange completes every other tick from tick 4 on, while new
    # requests arrive; the first new one gets tokens before the last exchange is done.
    tokens_at_drop = {request_id: len(t) for request_id, t in group.tokens.items()}
    exchange_order = sorted(group.waiting_for_kv)
    arrival_ticks = {0: 0, 3: 1, 5: 2, 8: 3, 12: 4, 15: 5}
    still_waiting: set[str] = set()
    for tick in range(26 if g == 2 else 34):
        if tick in arrival_ticks:
            k = arrival_ticks[tick]
            arrive(leader, f"new-{k}", NEW_PROMPT_LENGTHS[k], 500 + k, 10.0 + k)
        if tick >= 4 and tick % 2 == 0 and exchange_order:
            group.exchange(exchange_order.pop(0))
        scheduled = group.tick()
        assert not set(scheduled) & group.waiting_for_kv
        if not still_waiting and "new-0" in group.tokens:
            still_waiting = set(group.waiting_for_kv)
            assert all(
                len(group.tokens.get(i, [])) == tokens_at_drop.get(i, 0) for i in still_waiting
            )
    assert still_waiting and not exchange_order
    assert leader.pipeline.num_in_flight == g  # the restore comes mid-flight

    # Restore: drain, move KV home, leave the group, continue unpipelined.
    group.drain()
    assert group.restore("peers" if g == 2 else "source") == RESTORED[(formation, g)]
    arrive(members[-1], "late-0", 30, 900, 20.0)  # arrives just after the restore
    for member in members:
        assert member.layer_ranges.is_complete
        assert member.block_manager.num_total_blocks == 28
        while member.has_unfinished_requests():
            collect(member.step(), group.tokens)

    assert group.tokens == reference_tokens(make_engine, kernels, jobs)
    for member, digest in zip(members, digests, strict=True):
        assert weight_digest(member) == digest  # bit-identical after the restore
        member.check_integrity()
        assert member.block_manager.num_free_blocks == member.block_manager.num_total_blocks
