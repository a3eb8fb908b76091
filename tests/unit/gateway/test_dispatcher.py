"""gateway.dispatcher and cluster_view: scheduler first, then the cached view, then round robin."""

from __future__ import annotations

from dataclasses import replace

import grpc
import pytest

from gateway.admission import AdmissionControl
from gateway.cluster_view import ClusterView, InstanceView, view_from_proto
from gateway.dispatcher import Dispatcher, LostInstances, PlacementSource
from gateway.full_instances import FullInstances
from protos import scheduler_pb2
from services.common.convert import instance_spec_to_proto, load_to_proto
from services.common.errors import ResourceExhaustedError, UnavailableError
from services.common.messages import InstanceSpec, LoadReport
from services.policies import InstanceLoad, make_instance_load
from tests.clock import FakeClock


class FakeRpcError(grpc.aio.AioRpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        super().__init__(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=code.name)


class FakeScheduler:
    def __init__(self, reply=None, code=None) -> None:
        self.reply, self.code, self.requests = reply, code, []

    async def Dispatch(self, request, timeout):
        assert timeout > 0  # every call has a deadline
        self.requests.append(request)
        if self.code is not None:
            raise FakeRpcError(self.code)
        return self.reply


def spec_of(instance_id: str) -> InstanceSpec:
    return InstanceSpec(instance_id, f"addr-{instance_id}", "tiny", 16, 4, 0, 4, 2048, 258, 257)


def view_of(clock, *loads: tuple[str, int, int, int], terminating=()) -> ClusterView:
    """loads: (instance id, used blocks, running, waiting) of 100-block instances."""
    view = ClusterView(forget_after_s=10.0, clock=clock)
    view.update(
        [
            InstanceView(
                spec_of(i),
                make_instance_load(
                    i,
                    num_total_blocks=100,
                    num_used_blocks=used,
                    num_running=running,
                    num_waiting=waiting,
                    is_terminating=i in terminating,
                ),
            )
            for i, used, running, waiting in loads
        ]
    )
    return view


def make(clock, view, scheduler, lost=None):
    return Dispatcher(
        scheduler, view, lost or LostInstances(5.0, clock), timeout_s=1.0, view_stale_s=3.0
    )


async def test_the_scheduler_decides_when_it_answers_and_sees_the_exclusions():
    clock = FakeClock(100.0)
    lost = LostInstances(5.0, clock)
    lost.add("dead")
    scheduler = FakeScheduler(scheduler_pb2.DispatchResponse(instance_id="b", address="addr-b"))
    placement = await make(clock, view_of(clock, ("a", 0, 0, 0)), scheduler, lost).choose(
        "r", 10, 0, {"bad"}
    )
    assert (placement.instance_id, placement.address, placement.source) == (
        "b",
        "addr-b",
        PlacementSource.SCHEDULER,
    )
    assert list(scheduler.requests[0].exclude_instance_ids) == ["bad", "dead"]


async def test_scheduler_down_uses_freeness_of_the_cached_view_without_herding():
    clock = FakeClock(100.0)
    view = view_of(clock, ("a", 10, 1, 0), ("b", 10, 1, 0), ("c", 90, 1, 0))
    dispatcher = make(clock, view, FakeScheduler(code=grpc.StatusCode.UNAVAILABLE))
    chosen = [(await dispatcher.choose(f"r{i}", 320, 0, set())) for i in range(4)]
    assert {p.source for p in chosen} == {PlacementSource.CACHED_VIEW}
    # a and b look equally free, c is nearly full. Each placement (20 blocks) counts
    # as queued on the instance it went to, so the burst alternates instead of all
    # landing on a (the freest in the stale view).
    assert [p.instance_id for p in chosen] == ["a", "b", "a", "b"]


async def test_stale_view_falls_back_to_round_robin_and_skips_lost_instances():
    clock = FakeClock(100.0)
    view = view_of(clock, ("a", 0, 0, 0), ("b", 0, 0, 0), ("c", 0, 0, 0))
    lost = LostInstances(5.0, clock)
    lost.add("b")
    dispatcher = make(clock, view, FakeScheduler(code=grpc.StatusCode.DEADLINE_EXCEEDED), lost)
    clock.now += 4.0  # view older than view_stale_s
    chosen = [(await dispatcher.choose(f"r{i}", 16, 0, set())).instance_id for i in range(4)]
    assert chosen == ["a", "c", "a", "c"]
    clock.now += 5.0  # b's loss is forgotten after the TTL
    assert lost.recent() == set()


async def test_stale_view_round_robin_is_the_registered_policy_and_skips_draining_instances():
    clock = FakeClock(100.0)
    view = view_of(clock, ("a", 0, 0, 0), ("b", 0, 0, 0), ("c", 0, 0, 0), terminating={"a"})
    dispatcher = make(clock, view, FakeScheduler(code=grpc.StatusCode.UNAVAILABLE))
    clock.now += 4.0
    chosen = [await dispatcher.choose(f"r{i}", 16, 0, set()) for i in range(3)]
    assert [(p.instance_id, p.source) for p in chosen] == [
        ("b", PlacementSource.ROUND_ROBIN),
        ("c", PlacementSource.ROUND_ROBIN),
        ("b", PlacementSource.ROUND_ROBIN),
    ]


def test_view_from_proto_gives_each_load_the_block_size_of_its_registration():
    spec = InstanceSpec("a", "addr-a", "tiny", 32, 4, 0, 4, 2048, 258, 257)
    load = InstanceLoad("a", 100, 10, 1, 0, virtual_usage=10.0, freeness=90.0)
    state = scheduler_pb2.ClusterState(
        instances=[
            scheduler_pb2.InstanceState(
                info=instance_spec_to_proto(spec), load=load_to_proto(LoadReport(load, seq=4))
            )
        ]
    )
    [view] = view_from_proto(state)
    assert view == InstanceView(spec, replace(load, block_size=32))


async def test_no_candidate_anywhere_is_unavailable():
    clock = FakeClock(100.0)
    dispatcher = make(
        clock, view_of(clock, ("a", 0, 0, 0)), FakeScheduler(code=grpc.StatusCode.UNAVAILABLE)
    )
    with pytest.raises(UnavailableError, match="no instance can take request 'r'"):
        await dispatcher.choose("r", 16, 0, {"a"})


def test_view_keeps_instances_a_restarted_scheduler_forgot_for_a_while():
    clock = FakeClock(100.0)
    view = view_of(clock, ("a", 0, 0, 0), ("b", 0, 0, 0))
    limits = view.model_limits()
    view.update([])  # the restarted scheduler knows nobody yet
    assert sorted(view.instances) == ["a", "b"]
    clock.now += 11.0
    view.update([])
    assert view.instances == {}
    assert view.model_limits() == limits  # the model does not change
    assert limits.max_tokens_per_instance == 100 * 16


def test_admission_control_limits():
    clock = FakeClock(100.0)
    admission = AdmissionControl(max_inflight_requests=2, max_waiting_per_instance=3)
    view = view_of(clock, ("a", 0, 1, 3), ("b", 0, 1, 2))
    admission.check(1, view)
    with pytest.raises(ResourceExhaustedError, match="max_inflight_requests=2"):
        admission.check(2, view)
    full = view_of(clock, ("a", 0, 1, 3), ("b", 0, 1, 5))
    with pytest.raises(ResourceExhaustedError, match="max_waiting_per_instance"):
        admission.check(0, full)


async def test_a_failed_dispatch_marks_the_scheduler_down_until_a_refresh_reaches_it():
    clock = FakeClock(100.0)
    view = view_of(clock, ("a", 10, 1, 0), ("b", 20, 1, 0))
    scheduler = FakeScheduler(code=grpc.StatusCode.UNAVAILABLE)
    dispatcher = make(clock, view, scheduler)
    assert view.is_scheduler_reachable
    await dispatcher.choose("r0", 16, 0, set())
    assert view.is_scheduler_reachable is False
    # The next request decides locally at once: no second Dispatch deadline.
    placement = await dispatcher.choose("r1", 16, 0, set())
    assert (placement.source, len(scheduler.requests)) == (PlacementSource.CACHED_VIEW, 1)
    # Any other error (the scheduler answered) leaves the flag alone.
    view.update(list(view.instances.values()))
    await make(clock, view, FakeScheduler(code=grpc.StatusCode.RESOURCE_EXHAUSTED)).choose(
        "r2", 16, 0, set()
    )
    assert view.is_scheduler_reachable is True


async def test_instances_that_refused_as_full_are_skipped_for_their_hint_then_all_full_sheds():
    clock = FakeClock(100.0)
    view = view_of(clock, ("a", 0, 0, 0), ("b", 0, 0, 0))
    scheduler = FakeScheduler(scheduler_pb2.DispatchResponse(instance_id="b", address="addr-b"))
    dispatcher = Dispatcher(
        scheduler,
        view,
        LostInstances(5.0, clock),
        timeout_s=1.0,
        view_stale_s=3.0,
        full=FullInstances(clock),
    )
    dispatcher.note_full("a", 0.5)
    await dispatcher.choose("r1", 10, 0, set())
    assert list(scheduler.requests[-1].exclude_instance_ids) == ["a"]
    dispatcher.note_full("b", 0.2)
    with pytest.raises(ResourceExhaustedError) as info:
        await dispatcher.choose("r2", 10, 0, set())
    assert info.value.retry_after_s == pytest.approx(0.2)
    assert len(scheduler.requests) == 1  # shed without a Dispatch
    clock.now += 0.2  # b's hint ran out: b is a candidate again, a still full
    await dispatcher.choose("r3", 10, 0, set())
    assert list(scheduler.requests[-1].exclude_instance_ids) == ["a"]
    clock.now += 0.3
    await dispatcher.choose("r4", 10, 0, set())
    assert list(scheduler.requests[-1].exclude_instance_ids) == []
