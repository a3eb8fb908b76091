"""Scheduler.DropGroup / RestoreGroup in process, against a fake stage-0 worker."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from protos import common_pb2, group_pb2, scheduler_pb2
from services.common.convert_groups import group_from_proto
from services.common.groups import GroupMember, GroupStatus
from tests.unit.scheduler.fake_worker import TIMEOUT_S, scheduler_and_worker


@pytest.fixture
async def mesh():
    async with scheduler_and_worker() as mesh:
        yield mesh


async def drop(mesh, *instance_ids: str) -> scheduler_pb2.DropGroupResponse:
    return await mesh.stub.DropGroup(
        scheduler_pb2.DropGroupRequest(instance_ids=list(instance_ids)), timeout=TIMEOUT_S
    )


async def restore(mesh, group_id: str) -> scheduler_pb2.RestoreGroupResponse:
    return await mesh.stub.RestoreGroup(
        scheduler_pb2.RestoreGroupRequest(group_id=group_id), timeout=TIMEOUT_S
    )


async def cluster_groups(mesh) -> list:
    state = await mesh.stub.GetClusterState(
        scheduler_pb2.GetClusterStateRequest(), timeout=TIMEOUT_S
    )
    return [group_from_proto(g) for g in state.groups]


async def failure(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value.code(), info.value.details()


def member(mesh, instance_id: str, stage: int, start: int, end: int) -> GroupMember:
    return GroupMember(
        instance_id, mesh.worker_address, f"ucx-{instance_id}".encode(), stage, start, end
    )


async def test_drop_of_two_forms_the_group_through_stage_0_and_keeps_it(mesh):
    await mesh.register("a", "b")
    reply = await drop(mesh, "b", "a")
    # Stage 0 got the plan: the given order, halves of the layers, still DROPPING.
    (sent,) = mesh.worker.form_requests
    planned = group_from_proto(sent.group)
    assert (planned.group_id, planned.status, planned.num_group_blocks) == (
        "group-0",
        GroupStatus.DROPPING,
        0,
    )
    assert planned.members == (member(mesh, "b", 0, 0, 2), member(mesh, "a", 1, 2, 4))
    # The answer carries stage 0's figures; the group serves.
    group = group_from_proto(reply.group)
    assert group.status is GroupStatus.SERVING
    assert group.members == planned.members
    assert (group.num_group_blocks, group.num_blocks_before, group.freed_weight_bytes) == (
        330,
        200,
        6 * 2**20,
    )
    assert (group.block_size, reply.drop_ms) == (16, 12.5)
    assert await cluster_groups(mesh) == [group]


async def test_drop_of_four_splits_the_layers_in_four(mesh):
    await mesh.register("a", "b", "c", "d", num_layers=8, layer_end=8)
    reply = await drop(mesh, "a", "b", "c", "d")
    assert group_from_proto(reply.group).members == (
        member(mesh, "a", 0, 0, 2),
        member(mesh, "b", 1, 2, 4),
        member(mesh, "c", 2, 4, 6),
        member(mesh, "d", 3, 6, 8),
    )


async def test_bad_drop_requests_get_the_matching_codes(mesh):
    await mesh.register("a", "b", "c")
    await mesh.register("m", model_id="other")
    assert await failure(drop(mesh, "a")) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "instance_ids: a group needs 2 or more instances, got 1",
    )
    assert await failure(drop(mesh, "a", "m")) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "instance_ids: 'm' has model_id='other' but 'a' has 'tiny'; "
        "the members of a group must match",
    )
    assert await failure(drop(mesh, "a", "ghost")) == (
        grpc.StatusCode.NOT_FOUND,
        "instance 'ghost' is not registered",
    )
    await drop(mesh, "a", "b")
    assert await failure(drop(mesh, "c", "a")) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "instance 'a' is already in group 'group-0'",
    )
    assert len(mesh.worker.form_requests) == 1


async def test_a_stage_0_that_refuses_leaves_no_group(mesh):
    await mesh.register("a", "b")
    mesh.worker.error = (grpc.StatusCode.FAILED_PRECONDITION, "member 'b' refused: busy")
    code, details = await failure(drop(mesh, "a", "b"))
    assert (code, details) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        f"Worker.FormGroup on stage 0 'a' at {mesh.worker_address} refused: "
        "FAILED_PRECONDITION: member 'b' refused: busy",
    )
    assert await cluster_groups(mesh) == []
    mesh.worker.error = None
    assert (await drop(mesh, "a", "b")).group.group_id == "group-1"


async def test_an_unreachable_stage_0_is_unavailable_and_leaves_no_group(mesh):
    # Stage 0 registered at an address nothing listens on (a port the OS just freed).
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    await mesh.register("b")
    await mesh.register("a", address=f"127.0.0.1:{port}")
    code, details = await failure(drop(mesh, "a", "b"))
    assert code == grpc.StatusCode.UNAVAILABLE
    assert details.startswith(
        f"Worker.FormGroup on stage 0 'a' at 127.0.0.1:{port}: worker unreachable: "
    )
    assert await cluster_groups(mesh) == []
    assert mesh.worker.form_requests == []


async def test_a_stage_0_that_never_answers_runs_into_the_group_timeout():
    async with scheduler_and_worker(group_timeout_s=0.2) as mesh:
        await mesh.register("a", "b")
        mesh.worker.release = asyncio.Event()  # never set while the call runs
        assert await failure(drop(mesh, "a", "b")) == (
            grpc.StatusCode.DEADLINE_EXCEEDED,
            f"Worker.FormGroup on stage 0 'a' at {mesh.worker_address}: "
            "no answer within group_timeout_s=0.2",
        )
        assert await cluster_groups(mesh) == []


async def test_while_dropping_the_followers_take_no_dispatches(mesh):
    await mesh.register("a", "b")
    mesh.worker.release = asyncio.Event()
    dropping = asyncio.create_task(drop(mesh, "a", "b"))
    while not mesh.worker.form_requests:
        await asyncio.sleep(0.01)
    assert [(g.group_id, g.status) for g in await cluster_groups(mesh)] == [
        ("group-0", GroupStatus.DROPPING)
    ]
    assert await failure(restore(mesh, "group-0")) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "group 'group-0' is dropping; only a serving group can be restored",
    )
    # b (stage 1) does not report its group yet, but the scheduler knows.
    chosen = await mesh.stub.Dispatch(
        scheduler_pb2.DispatchRequest(request_id="r1", num_prompt_tokens=16), timeout=TIMEOUT_S
    )
    assert chosen.instance_id == "a"
    code, _ = await failure(
        mesh.stub.Dispatch(
            scheduler_pb2.DispatchRequest(request_id="r2", exclude_instance_ids=["a"]),
            timeout=TIMEOUT_S,
        )
    )
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    mesh.worker.release.set()
    assert (await dropping).group.status == group_pb2.GROUP_STATUS_SERVING


async def test_restore_dissolves_through_stage_0_and_forgets_the_group(mesh):
    await mesh.register("a", "b")
    await drop(mesh, "a", "b")
    reply = await restore(mesh, "group-0")
    assert (reply.num_requests_moved, reply.num_preempted, reply.restore_ms) == (3, 1, 40.25)
    assert [r.group_id for r in mesh.worker.dissolve_requests] == ["group-0"]
    assert await cluster_groups(mesh) == []
    # Its members can form a new group.
    assert (await drop(mesh, "b", "a")).group.group_id == "group-1"


async def test_bad_or_failed_restores(mesh):
    await mesh.register("a", "b")
    assert await failure(restore(mesh, "")) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "group_id must not be empty",
    )
    assert await failure(restore(mesh, "group-0")) == (
        grpc.StatusCode.NOT_FOUND,
        "group 'group-0' does not exist; known: []",
    )
    await drop(mesh, "a", "b")
    mesh.worker.error = (grpc.StatusCode.UNAVAILABLE, "stage 1 gone")
    code, details = await failure(restore(mesh, "group-0"))
    assert (code, details) == (
        grpc.StatusCode.UNAVAILABLE,
        f"Worker.DissolveGroup on stage 0 'a' at {mesh.worker_address}: "
        "worker unreachable: stage 1 gone",
    )
    # The group still serves: the restore can be tried again.
    assert [(g.group_id, g.status) for g in await cluster_groups(mesh)] == [
        ("group-0", GroupStatus.SERVING)
    ]
    mesh.worker.error = None
    assert (await restore(mesh, "group-0")).num_requests_moved == 3


async def test_a_deregistered_member_takes_its_group_along(mesh):
    await mesh.register("a", "b")
    await drop(mesh, "a", "b")
    await mesh.stub.DeregisterInstance(
        scheduler_pb2.DeregisterInstanceRequest(instance_id="b"), timeout=TIMEOUT_S
    )
    assert await cluster_groups(mesh) == []


async def test_the_groups_members_report_are_learned_from_the_load_streams(mesh):
    # A restarted scheduler: the workers register again and report their group.
    await mesh.register("a", "b")
    queue: asyncio.Queue = asyncio.Queue()

    async def reports():
        while True:
            yield await queue.get()

    call = mesh.stub.StreamLoad(reports())  # one stream carries both, for brevity
    for seq, (instance_id, stage, layers, total) in enumerate(
        (("b", 1, (2, 4), 0), ("a", 0, (0, 2), 380)), start=1
    ):
        queue.put_nowait(
            common_pb2.LoadReport(
                instance_id=instance_id,
                seq=seq,
                num_total_blocks=total,
                group_id="group-4",
                group_stage=stage,
                layer_start=layers[0],
                layer_end=layers[1],
                freed_weight_bytes=1000,
            )
        )
    for _ in range(200):
        if await cluster_groups(mesh):
            break
        await asyncio.sleep(0.01)
    (group,) = await cluster_groups(mesh)
    assert group.group_id == "group-4"
    assert group.status is GroupStatus.SERVING
    assert group.members == (member(mesh, "a", 0, 0, 2), member(mesh, "b", 1, 2, 4))
    assert (group.num_group_blocks, group.freed_weight_bytes) == (380, 2000)
    # And it can be restored like one this scheduler formed.
    assert (await restore(mesh, "group-4")).restore_ms == 40.25
    call.cancel()
