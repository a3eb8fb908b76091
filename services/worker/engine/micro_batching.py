"""How a KunServe group's leader cuts its work into micro-batches (torch-free).

Two formations, picked by `MicroBatchFormation.name`:

- **simple**: each micro-batch gets an even share of the step's limits
  (max_num_seqs / M requests, max_num_batched_tokens / M tokens, M = micro-batches in
  flight) and is filled in policy order, like a step. Costs follow whatever the queue
  holds: 8 decodes in one micro-batch and 2 in the next, or a prefill chunk next to
  decodes, and the cheap micro-batches wait on the dear ones (bubbles).
- **lookahead**: micro-batches of equal modelled cost (`MicroBatchCost`, the cost
  model's step time). The round ahead (the next M micro-batches: every request once)
  holds the requests that can run now, the ones in flight (they come back within the
  round) and the waiting ones that will be admitted; its cost spread over M gives the
  target of this micro-batch by water-filling, since one request is in at most one
  micro-batch of a round:

      costs of the round's items (prefills already capped to the round's token budget)
        |####                 level = target: sum(min(cost_i, level)) = M * level
        |####  ####           a prefill above the level is cut to a chunk that
        |####  ####  ##  #    costs the level, the rest waits for the next round
        +-------------------

  The micro-batch then takes the requests that can run now, running ones first
  (those back the longest first), then the waiting ones in policy order, each decode
  whole when that brings the cost nearer the target, each prefill as the chunk that
  fills the gap (at least min_chunk_tokens, so that a long prompt still advances when
  the group has little else to do).

Item cost (one request's chunk of t tokens over c computed ones) is the cost model's
step time without its fixed part: the fixed part is paid once per micro-batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from services.worker.engine.cost_model import CostModelProfile
from services.worker.engine.scheduler import SchedulerOutput

FORMATIONS = ("lookahead", "simple")
# Relative slack when comparing modelled costs (sums of floats in another order).
_EPS = 1e-9


@dataclass(frozen=True)
class MicroBatchCost:
    """The cost model's step time (cost_model.py) of a micro-batch on the whole model."""

    fixed_s: float
    per_token_s: float
    per_seq_s: float
    per_context_token_s: float
    per_attention_pair_s: float

    @classmethod
    def from_profile(cls, profile: CostModelProfile) -> MicroBatchCost:
        return cls(*profile.coefficients())

    def item_s(self, num_computed_tokens: int, num_tokens: int) -> float:
        """One request's share: a chunk of num_tokens after num_computed_tokens."""
        t, c = num_tokens, num_computed_tokens
        return (
            self.per_token_s * t
            + self.per_seq_s
            + self.per_context_token_s * (c + t)
            + self.per_attention_pair_s * (t * c + t * (t + 1) // 2)
        )

    def batch_s(self, batch: SchedulerOutput) -> float:
        """A scheduled micro-batch (0 when empty): CostModel.step_time on every layer."""
        if batch.is_empty:
            return 0.0
        return self.fixed_s + sum(
            self.item_s(r.num_computed_tokens, len(r.token_ids)) for r in batch.requests
        )

    def max_chunk(self, num_computed_tokens: int, max_tokens: int, budget_s: float) -> int:
        """The most tokens (<= max_tokens) of a chunk whose item cost fits budget_s: 0
        when not even one does. Item cost grows with the chunk: binary search."""
        lo, hi = 0, max_tokens
        limit = budget_s * (1 + _EPS)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.item_s(num_computed_tokens, mid) <= limit:
                lo = mid
            else:
                hi = mid - 1
        return lo


# A prompt the lookahead formation leaves out of this many rounds of micro-batches in a
# row (M each) is starved: it gets at least the floor in the next one, over the level if
# need be (a chunked prefill first; a waiting prompt in its FCFS place after the running
# ones, where the scheduler admits it: first, it would block the whole micro-batch when
# it cannot be allocated). Balancing alone can leave it out for as long as decodes keep
# coming (each micro-batch filled to just under the level, the prompt's share below the
# floor). Sixteen rounds leave the balance of the bubble tests (test_micro_batching.py)
# as it was without the rule, and on `simulate --burst` x9 give kunserve a P99 TTFT of
# 1.90 s (four rounds: 3.39 s; never: 2.24 s, with a tail request stuck 9 s).
STARVED_AFTER_ROUNDS = 16


@dataclass(frozen=True)
class Candidate:
    """A request's next chunk as the former sees it."""

    request_id: str
    num_computed_tokens: int  # KV already computed (or in flight before this chunk)
    num_remaining_tokens: int  # tokens to compute to catch up: 1 when decoding
    is_waiting: bool = False  # admitted by this micro-batch (needs its blocks allocated)
    # Passed over by a whole round of micro-batches: gets the floor even above the level.
    is_starved: bool = False


@dataclass(frozen=True)
class MicroBatchFormation:
    """Which formation the leader runs, with its limits. Limits are the group step's:
    the simple formation gives each micro-batch 1/num_micro_batches of them; the
    lookahead one bounds the micro-batches in flight together by them."""

    name: str = "lookahead"  # one of FORMATIONS
    num_micro_batches: int = 2  # in flight at once (M)
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    cost: MicroBatchCost | None = None  # lookahead: the cost model
    min_chunk_tokens: int = 32  # lookahead: smallest prefill chunk cut below its remainder

    def __post_init__(self) -> None:
        if self.name not in FORMATIONS:
            raise ValueError(f"micro-batch formation {self.name!r} is not one of {FORMATIONS}")
        for name in ("num_micro_batches", "max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.min_chunk_tokens < 1:
            raise ValueError(f"min_chunk_tokens={self.min_chunk_tokens} must be >= 1")
        if self.name == "lookahead" and self.cost is None:
            raise ValueError("the lookahead formation needs a cost model (cost=MicroBatchCost)")


def token_cap(num_tokens: Sequence[int], budget: int) -> int:
    """The largest L with sum(min(t, L)) <= budget (the round's token budget shared out
    by water-filling: short chunks whole, long ones cut to L); max(t) when all fit."""
    if sum(num_tokens) <= budget:
        return max(num_tokens, default=0)
    lo, hi = 0, max(num_tokens)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sum(min(t, mid) for t in num_tokens) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def water_level(costs: Sequence[float], num_micro_batches: int) -> float:
    """The target cost of each of M micro-batches holding these items, an item in at
    most one: the level with sum(min(cost, level)) = M * level (items above it are cut
    to it). With too few items to fill M micro-batches, the dearest item's cost."""
    ordered = sorted(costs, reverse=True)
    rest = sum(ordered)
    for j in range(min(len(ordered), num_micro_batches)):
        # Items 0..j-1 are cut to the level, j.. are whole.
        level = rest / (num_micro_batches - j)
        below = ordered[j - 1] if j else float("inf")
        if ordered[j] <= level * (1 + _EPS) and level <= below * (1 + _EPS):
            return level
        rest -= ordered[j]
    return ordered[0] if ordered else 0.0


def plan_lookahead(
    available: Sequence[Candidate],
    returning: Sequence[Candidate],
    cost: MicroBatchCost,
    num_micro_batches: int,
    round_max_tokens: int,
    max_num_seqs: int,
    max_num_batched_tokens: int,
    min_chunk_tokens: int = 32,
) -> list[tuple[str, int]]:
    """One balanced micro-batch: [(request_id, tokens of its chunk)], in the order given.

    available: the requests it may take, running first then waiting, in the order to
      take them; returning: the requests in flight (their chunk after this one), which
      only shape the target. round_max_tokens: the tokens M micro-batches may hold
      together; max_num_seqs / max_num_batched_tokens: what this one may hold (the
      limits less what is in flight)."""
    items = [*returning, *available]
    if not available or max_num_seqs < 1 or max_num_batched_tokens < 1:
        return []
    cap = token_cap([c.num_remaining_tokens for c in items], round_max_tokens)
    cap = max(cap, 1)
    level = water_level(
        [cost.item_s(c.num_computed_tokens, min(c.num_remaining_tokens, cap)) for c in items],
        num_micro_batches,
    )
    plan: list[tuple[str, int]] = []
    filled = 0.0
    tokens_left = max_num_batched_tokens
    floor_taken = False  # a prompt chunk below the level's share was raised to the floor
    # Starved running prompts (chunked prefills) first: they get their share or the
    # floor, and the decodes fill the rest of the level. Waiting ones keep their place
    # after every running one (FCFS; the scheduler admits them only there).
    first = [c for c in available if c.is_starved and not c.is_waiting]
    ordered = first + [c for c in available if not (c.is_starved and not c.is_waiting)]
    for c in ordered:
        if len(plan) == max_num_seqs or tokens_left == 0:
            break
        limit = min(c.num_remaining_tokens, cap, tokens_left)
        if c.num_remaining_tokens == 1:  # a decode (or a prompt's last token): whole
            item = cost.item_s(c.num_computed_tokens, 1)
            num_tokens = 1 if not plan or filled + item / 2 <= level * (1 + _EPS) else 0
        else:
            num_tokens = cost.max_chunk(c.num_computed_tokens, limit, level - filled)
            floor = min(min_chunk_tokens, limit)
            if num_tokens < floor:
                # Short of the floor: the prompt waits for a later micro-batch, unless it
                # is this one's first item, or it has been passed over for rounds
                # (`is_starved`: a steady stream of decodes can fill every micro-batch to
                # just under the level for as long as they run). One such prompt per
                # micro-batch, which then overshoots the level by at most a floor chunk.
                if not plan or (c.is_starved and not floor_taken):
                    num_tokens, floor_taken = floor, True
                else:
                    num_tokens = 0
        if num_tokens == 0:
            if c.is_waiting:
                break  # FCFS: a waiting request that waits blocks the ones behind it
            continue
        plan.append((c.request_id, num_tokens))
        filled += cost.item_s(c.num_computed_tokens, num_tokens)
        tokens_left -= num_tokens
    return plan
