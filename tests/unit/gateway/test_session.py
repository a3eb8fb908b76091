"""gateway.session: a failover keeps trying to place its request for a while."""

from __future__ import annotations

import grpc
import pytest

from gateway.dispatcher import Placement, PlacementSource
from gateway.session import GenerationSession
from gateway.tracker import PlacementStatus, RequestTracker
from gateway.validation import GenerationSpec
from services.common.errors import ResourceExhaustedError, UnavailableError
from services.common.messages import FinishReason, OutputDelta, SamplingSpec


class FlakyDispatcher:
    """No instance for the first `num_refusals` choices, then instance b."""

    def __init__(self, num_refusals: int) -> None:
        self.num_refusals = num_refusals
        self.excluded_seen: list[set[str]] = []

    async def choose(self, request_id, num_tokens, priority, exclude):
        self.excluded_seen.append(set(exclude))
        if len(self.excluded_seen) <= self.num_refusals:
            raise UnavailableError("no instance can take it now")
        return Placement("b", "addr-b", PlacementSource.SCHEDULER)


class Pool:
    def __init__(self) -> None:
        self.submitted: list[str] = []

    async def submit(self, instance_id, address, state):
        self.submitted.append(instance_id)


def session(dispatcher, pool, failover_wait_s: float) -> GenerationSession:
    spec = GenerationSpec("r", (1, 2, 3), SamplingSpec(max_tokens=8, seed=1), 0, False)
    return GenerationSession(
        spec, RequestTracker("r"), dispatcher, pool, "owner", 2, failover_wait_s
    )


async def test_a_failover_waits_for_an_instance_and_gives_refusers_another_try():
    dispatcher, pool = FlakyDispatcher(num_refusals=3), Pool()
    s = session(dispatcher, pool, failover_wait_s=5.0)
    s._excluded = {"a", "c"}  # a was lost, c refused earlier
    await s._place_again("a")
    assert pool.submitted == ["b"]
    # The first try still skips c; after a wait only the lost instance is skipped.
    assert dispatcher.excluded_seen == [{"a", "c"}, {"a"}, {"a"}, {"a"}]


async def test_a_failover_gives_up_after_its_wait():
    dispatcher, pool = FlakyDispatcher(num_refusals=1000), Pool()
    s = session(dispatcher, pool, failover_wait_s=0.0)
    with pytest.raises(UnavailableError, match="no instance can take it now"):
        await s._place_again("a")
    assert (pool.submitted, len(dispatcher.excluded_seen)) == ([], 1)


class FinishingPool(Pool):
    """Every output arrives (and finishes the request) before Submit's reply does;
    records abort calls."""

    def __init__(self, tracker: RequestTracker, reason: FinishReason) -> None:
        super().__init__()
        self.tracker, self.reason = tracker, reason
        self.aborted: list[str] = []

    async def submit(self, instance_id, address, state):
        await super().submit(instance_id, address, state)
        if self.reason is FinishReason.ABORT:
            self.tracker.finish_aborted()
        else:
            self.tracker.on_output(OutputDelta("r", 0, (5, 6), self.reason), instance_id)

    def abort_soon(self, instance_id, request_id):
        self.aborted.append(instance_id)


@pytest.mark.parametrize(
    ("reason", "aborted"), [(FinishReason.LENGTH, []), (FinishReason.ABORT, ["b"])]
)
async def test_a_request_finished_before_submit_replied_is_placed_not_aborted(reason, aborted):
    s = session(FlakyDispatcher(num_refusals=0), None, failover_wait_s=0.0)
    pool = s._pool = FinishingPool(s.tracker, reason)
    s._abort_on_worker = lambda: pool.abort_soon(s.tracker.instance_id, "r")
    await s.place()
    assert (s.num_placements, pool.aborted, s.tracker.finish_reason) == (1, aborted, reason)


class FullPool(Pool):
    """Every instance refuses Submit as full, with its retry hint."""

    def __init__(self, hints_ms: dict[str, str]) -> None:
        super().__init__()
        self.hints_ms = hints_ms

    async def submit(self, instance_id, address, state):
        self.submitted.append(instance_id)
        raise grpc.aio.AioRpcError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            grpc.aio.Metadata(),
            grpc.aio.Metadata(("retry-after-ms", self.hints_ms[instance_id])),
            details=f"instance {instance_id} has 4 requests waiting",
        )


class TwoInstances:
    """a, then b, then nothing left (every instance excluded)."""

    def __init__(self) -> None:
        self.full: dict[str, float] = {}

    def note_full(self, instance_id, retry_after_s):
        self.full[instance_id] = retry_after_s

    async def choose(self, request_id, num_tokens, priority, exclude):
        for name in ("a", "b"):
            if name not in exclude:
                return Placement(name, f"addr-{name}", PlacementSource.SCHEDULER)
        raise UnavailableError("no instance left")


async def test_every_instance_full_sheds_with_the_shortest_retry_hint():
    pool = FullPool({"a": "300", "b": "200"})
    dispatcher = TwoInstances()
    s = GenerationSession(
        GenerationSpec("r", (1, 2, 3), SamplingSpec(max_tokens=8, seed=1), 0, False),
        RequestTracker("r"),
        dispatcher,
        pool,
        "owner",
        4,
    )
    with pytest.raises(ResourceExhaustedError) as info:
        await s.place()
    assert pool.submitted == ["a", "b"]
    assert info.value.retry_after_s == 0.2
    assert dispatcher.full == {"a": 0.3, "b": 0.2}  # later placements skip them meanwhile
    assert "their waiting queues are full" in str(info.value)
    assert s.tracker.status is PlacementStatus.UNPLACED
