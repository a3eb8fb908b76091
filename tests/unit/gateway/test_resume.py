"""gateway.resume: taking over a request from a dead gateway (Worker.Rehome answers)."""

from __future__ import annotations

import grpc
import pytest

from gateway import resume
from gateway.cluster_view import ClusterView, InstanceView
from gateway.generations import PlacementSettings
from gateway.resume import Resumer
from gateway.sessions import SessionTable
from protos import common_pb2, gateway_pb2, worker_pb2
from services.common.errors import AlreadyExistsError, NotFoundError
from services.common.messages import FinishReason, OutputDelta
from services.policies import make_instance_load
from tests.clock import FakeClock
from tests.unit.gateway.test_dispatcher import FakeRpcError, spec_of


def answer(instance_id, tokens, *, epoch=0, finish=common_pb2.FINISH_REASON_UNSPECIFIED):
    state = common_pb2.RequestState(
        request_id="r",
        prompt_token_ids=[1, 2, 3],
        output_token_ids=tokens,
        sampling=common_pb2.SamplingParams(max_tokens=6, seed=42, temperature=0.5),
        priority=1,
        owner_address="gw-b:1",
        placement_epoch=epoch,
    )
    return worker_pb2.RehomeResponse(
        found=True, state=state, finish_reason=finish, instance_id=instance_id
    )


class FakePool:
    """Worker.Rehome answers by instance id; `during` runs inside the call (outputs the
    worker pushes to the new gateway before its answer arrives)."""

    def __init__(self, answers: dict, during=None) -> None:
        self.answers = answers
        self.during = during
        self.calls: list[tuple[str, str, str, int]] = []

    async def rehome(self, instance_id, address, request_id, owner_address, next_index):
        self.calls.append((instance_id, request_id, owner_address, next_index))
        if self.during is not None:
            self.during(instance_id)
        reply = self.answers.get(instance_id)
        if isinstance(reply, Exception):
            raise reply
        return reply or worker_pb2.RehomeResponse(found=False, instance_id=instance_id)


def make(pool, *instance_ids):
    view = ClusterView(clock=FakeClock())
    view.update(
        [
            InstanceView(
                spec_of(i),
                make_instance_load(i, num_total_blocks=10, num_used_blocks=0, num_running=1),
            )
            for i in instance_ids
        ]
    )
    sessions = SessionTable()
    resumer = Resumer(
        sessions=sessions,
        view=view,
        dispatcher=None,
        pool=pool,
        placement=PlacementSettings(owner_address="gw-b:1", max_placements=2),
    )
    return resumer, sessions


async def chunks_of(session, start):
    return [
        (c.first_token_index, c.token_ids, c.finish_reason) async for c in session.chunks(start)
    ]


async def test_the_holder_re_homes_it_and_the_stream_goes_on_from_next_index():
    sessions_ref = []

    def push(instance_id):  # the worker switched owners: a step's tokens arrive first
        if instance_id == "a":
            orphans = sessions_ref[0].on_outputs(
                "a", [OutputDelta("r", 4, (14,)), OutputDelta("r", 5, (15,), FinishReason.LENGTH)]
            )
            assert orphans == []  # kept for the placeholder, not aborted

    pool = FakePool({"a": answer("a", [10, 11, 12, 13])}, during=push)
    resumer, sessions = make(pool, "a", "b")
    sessions_ref.append(sessions)
    session = await resumer.take_over(gateway_pb2.ResumeRequest(request_id="r", next_index=3))
    assert sorted(pool.calls) == [("a", "r", "gw-b:1", 3), ("b", "r", "gw-b:1", 3)]
    assert sessions.get("r") is session
    spec = session.spec
    assert (spec.prompt_token_ids, spec.sampling.seed, spec.sampling.temperature) == (
        (1, 2, 3),
        42,
        0.5,
    )
    assert (spec.priority, session.tracker.instance_id) == (1, "a")
    assert await chunks_of(session, 3) == [(3, [13, 14, 15], FinishReason.LENGTH)]


async def test_while_it_migrates_both_ends_re_home_and_the_newer_placement_runs_it():
    pool = FakePool(
        {"src": answer("src", [1, 2], epoch=0), "dst": answer("dst", [1, 2, 3], epoch=1)}
    )
    resumer, _ = make(pool, "src", "dst")
    session = await resumer.take_over(gateway_pb2.ResumeRequest(request_id="r", next_index=0))
    assert (session.tracker.instance_id, session.tracker.placement_epoch) == ("dst", 1)
    assert session.tracker.tokens == [1, 2, 3]


async def test_a_request_that_finished_meanwhile_is_still_delivered():
    pool = FakePool({"a": answer("a", [5, 6], finish=common_pb2.FINISH_REASON_STOP)})
    resumer, _ = make(pool, "a")
    session = await resumer.take_over(gateway_pb2.ResumeRequest(request_id="r", next_index=2))
    assert await chunks_of(session, 2) == [(2, [], FinishReason.STOP)]


async def test_a_move_notice_re_homes_it_on_the_destination_too():
    pool = FakePool({"src": answer("src", [1])})
    resumer, sessions = make(pool, "src", "dst")
    session = await resumer.take_over(gateway_pb2.ResumeRequest(request_id="r", next_index=1))
    # The destination adopted it with the old gateway as owner: tokens 1 and 2 went there.
    pool.answers["dst"] = answer("dst", [1, 2, 3], epoch=1)
    pool.calls.clear()
    sessions.on_outputs(
        "src",
        [
            OutputDelta(
                "r",
                1,
                (),
                moved_to_instance_id="dst",
                moved_to_address="addr-dst",
                placement_epoch=1,
            )
        ],
    )
    for task in list(resumer._background):
        await task
    assert pool.calls == [("dst", "r", "gw-b:1", 0)]
    assert (session.tracker.tokens, session.tracker.instance_id) == ([1, 2, 3], "dst")


async def test_unknown_or_expired_is_not_found_naming_the_request(monkeypatch):
    monkeypatch.setattr(resume, "SWEEP_RETRY_S", 0.0)
    pool = FakePool({"b": FakeRpcError(grpc.StatusCode.UNAVAILABLE)})
    resumer, sessions = make(pool, "a", "b")
    with pytest.raises(NotFoundError, match="request_id 'r' is not running on any instance"):
        await resumer.take_over(gateway_pb2.ResumeRequest(request_id="r", next_index=0))
    assert len(pool.calls) == 2 * resume.SWEEP_TRIES  # a migration's commit may hide it
    assert sessions.get("r") is None


async def test_next_index_beyond_the_tokens_is_refused_naming_it():
    refusal = grpc.aio.AioRpcError(
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(),
        details="next_index=9 is beyond the 4 tokens request 'r' has produced",
    )
    resumer, sessions = make(FakePool({"a": refusal}), "a", "b")
    with pytest.raises(ValueError, match="next_index=9 is beyond the 4 tokens"):
        await resumer.take_over(gateway_pb2.ResumeRequest(request_id="r", next_index=9))
    assert sessions.get("r") is None
    with pytest.raises(ValueError, match="next_index=-1 must be >= 0"):
        await resumer.take_over(gateway_pb2.ResumeRequest(request_id="r", next_index=-1))
    with pytest.raises(ValueError, match="request_id='' must be"):
        await resumer.take_over(gateway_pb2.ResumeRequest(next_index=0))


async def test_a_request_in_flight_here_is_not_taken_over_twice():
    pool = FakePool({"a": answer("a", [1])})
    resumer, _ = make(pool, "a")
    await resumer.take_over(gateway_pb2.ResumeRequest(request_id="r", next_index=0))
    with pytest.raises(AlreadyExistsError, match="request_id 'r' is already in flight"):
        await resumer.take_over(gateway_pb2.ResumeRequest(request_id="r", next_index=0))


async def test_a_move_to_a_destination_that_no_longer_has_it_re_places_it():
    pool = FakePool({"src": answer("src", [1])})
    resumer, sessions = make(pool, "src", "dst")
    session = await resumer.take_over(gateway_pb2.ResumeRequest(request_id="r", next_index=1))
    # It moved to dst, where it is gone (aborted before this gateway re-homed it there).
    notice = OutputDelta(
        "r", 1, (), moved_to_instance_id="dst", moved_to_address="addr-dst", placement_epoch=1
    )
    sessions.on_outputs("src", [notice])
    for task in list(resumer._background):
        await task
    assert pool.calls[-1] == ("dst", "r", "gw-b:1", 0)
    tracker = session.tracker
    assert (tracker.instance_id, tracker.needs_placement) == ("dst", True)
    assert tracker.lost_reason == "not found at dst after it moved there"


async def test_only_requests_a_session_here_served_are_aborted_as_orphans():
    pool = FakePool({"a": answer("a", [1])})
    resumer, sessions = make(pool, "a")
    session = await resumer.take_over(gateway_pb2.ResumeRequest(request_id="r", next_index=0))
    step = [OutputDelta("r", 1, (2,)), OutputDelta("foreign", 0, (7,))]
    # Another gateway's request (e.g. of the one at this address before a restart: its
    # client is resuming it elsewhere) is left alone; ours is ours.
    assert sessions.on_outputs("a", step) == []
    assert session.tracker.tokens == [1, 2]
    sessions.remove(session)  # its client left: what still comes is an orphan of ours
    assert sessions.on_outputs("a", step) == ["r"]


async def test_a_failed_take_over_leaves_no_orphan_to_abort():
    # a re-homed it here, then the resume failed (next_index beyond its tokens): what a
    # sends here now is not this gateway's to abort (the client may resume again).
    resumer, sessions = make(FakePool({"a": answer("a", [1, 2])}), "a")
    with pytest.raises(ValueError, match="next_index=5 is beyond the 2 tokens"):
        await resumer.take_over(gateway_pb2.ResumeRequest(request_id="r", next_index=5))
    assert sessions.on_outputs("a", [OutputDelta("r", 2, (3,))]) == []
