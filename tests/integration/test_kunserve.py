"""KunServe on real processes: workers drop layers and serve as one pipeline, KV moves
over the data plane, the group restores; every request's tokens are exactly those of
one unloaded engine, and no block leaks on any member.

A mesh of its own (4 workers with a small pool), so groups never disturb the other
integration tests; every test leaves every worker alone (no group), idle and clean.
"""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from services.common.procs import LocalMesh
from tests.integration.conftest import (
    cluster_state,
    reference_tokens,
    wait_until,
    wait_worker_idle,
    worker_load,
)
from tests.integration.kunserve_helpers import drop, restore, run_streams, trickle, workload

NUM_WORKERS = 4


@pytest.fixture(scope="module")
def kmesh(tmp_path_factory):
    mesh = LocalMesh(
        log_dir=tmp_path_factory.mktemp("kmesh"),
        num_workers=NUM_WORKERS,
        env={
            "LLMESH_WORKER_TORCH_THREADS": "1",
            "LLMESH_WORKER_ENGINE_MEMORY_CAPACITY_BYTES": str(32 << 20),
            # Groups form and dissolve only when these tests say (test_kunserve_policy.py
            # covers the scheduler's own decisions).
            "LLMESH_SCHEDULER_GROUP_POLICY": "none",
        },
    )
    mesh.start()
    # Every worker has the same pool; a restore must bring back exactly this.
    mesh.pool_blocks = worker_load(mesh.workers[0].address).load.num_total_blocks
    yield mesh
    mesh.stop()
    assert [p.name for p in mesh.processes() if p.is_alive()] == []


@pytest.fixture(autouse=True)
def _members_alone_and_clean(request):
    yield
    if "kmesh" not in request.fixturenames:
        return
    mesh = request.getfixturevalue("kmesh")
    wait_until(
        lambda: not cluster_state(mesh.scheduler_address).groups,
        what="no group left at the scheduler",
    )
    for worker in mesh.live_workers():
        report = wait_worker_idle(worker.address)
        assert report.integrity_error == "", f"{worker.name}: {report.integrity_error}"
        load = report.load
        assert (load.num_running, load.num_waiting, load.num_used_blocks) == (0, 0, 0)
        assert (load.group_id, report.layer_start, report.layer_end) == ("", 0, 4)
        assert load.num_total_blocks == mesh.pool_blocks


def _names(mesh) -> list[str]:
    return [w.name for w in mesh.live_workers()]


@pytest.mark.parametrize("num_stages", [2, 4])
def test_drop_serve_restore_gives_exact_tokens(kmesh, reference_engine, num_stages):
    """Requests running on the members when they drop (their KV is exchanged), requests
    that arrive while the group serves (they cross the restore), all exact."""
    members = _names(kmesh)[:num_stages]
    before = workload(8, num_stages, 700)
    during_group = workload(4, 50 + num_stages, 500)
    expected = reference_tokens(reference_engine, before)
    expected_during = reference_tokens(reference_engine, during_group)
    figures = {}

    def during():
        reply = drop(kmesh, members)
        group = reply.group
        figures["drop"] = reply
        assert [m.instance_id for m in group.members] == members
        step = 4 // num_stages
        assert [(m.layer_start, m.layer_end) for m in group.members] == [
            (s * step, (s + 1) * step) for s in range(num_stages)
        ]
        assert group.num_group_blocks >= group.num_blocks_before > 0
        assert group.freed_weight_bytes > 0
        state = cluster_state(kmesh.scheduler_address)
        assert [g.group_id for g in state.groups] == [group.group_id]
        # Each member reports its stage and layers.
        for m in group.members:
            address = next(w.address for w in kmesh.workers if w.name == m.instance_id)
            report = wait_until(
                lambda a=address: (r := worker_load(a)).load.group_id == group.group_id and r,
                what=f"{m.instance_id} to report its group",
            )
            assert (report.load.group_stage, report.layer_start, report.layer_end) == (
                m.stage,
                m.layer_start,
                m.layer_end,
            )

        # Requests that arrive while the group serves; the restore comes mid-stream.
        def stream_in_group():
            try:
                figures["during"] = run_streams(
                    kmesh, during_group, f"in-group-{num_stages}", lambda: None
                )
            except Exception as exc:  # reported by the assertion below, with its reason
                figures["during"] = exc

        in_group = threading.Thread(target=stream_in_group)
        in_group.start()
        time.sleep(1.0)
        figures["restore"] = restore(kmesh, group.group_id)
        in_group.join()

    tokens = run_streams(kmesh, before, f"drop-{num_stages}", during)
    assert tokens == expected
    assert not isinstance(figures["during"], Exception), figures["during"]
    assert figures["during"] == expected_during
    assert figures["drop"].group.group_id
    assert figures["restore"].restore_ms > 0


def test_drop_refuses_bad_groups_with_clear_errors(kmesh):
    names = _names(kmesh)
    for instance_ids, code, needle in [
        ([names[0]], grpc.StatusCode.INVALID_ARGUMENT, "instance_ids"),
        ([names[0], names[0]], grpc.StatusCode.INVALID_ARGUMENT, "instance_ids"),
        ([names[0], "nope"], grpc.StatusCode.NOT_FOUND, "nope"),
    ]:
        with pytest.raises(grpc.RpcError) as info:
            drop(kmesh, instance_ids)
        assert info.value.code() == code
        assert needle in info.value.details()


def test_kill_9_of_a_stage_dissolves_the_group_and_requests_finish_exactly(kmesh, reference_engine):
    members = _names(kmesh)[:2]
    requests = workload(6, 77, 900)
    expected = reference_tokens(reference_engine, requests)
    killed = threading.Event()

    def during():
        drop(kmesh, members)
        time.sleep(0.5)
        victim = next(w for w in kmesh.workers if w.name == members[1])
        victim.kill()
        killed.set()

    tokens = run_streams(kmesh, requests, "kill-stage", during)
    assert killed.is_set()
    assert tokens == expected
    leader = next(w for w in kmesh.workers if w.name == members[0])
    report = wait_until(
        lambda: (r := worker_load(leader.address)).load.group_id == "" and r,
        what="stage 0 to serve alone again",
    )
    assert (report.layer_start, report.layer_end) == (0, 4)
    wait_until(
        lambda: (
            members[1]
            not in {i.info.instance_id for i in cluster_state(kmesh.scheduler_address).instances}
        ),
        what="the dead member's lease to expire",
    )
    kmesh.add_worker()
    wait_until(
        lambda: len(cluster_state(kmesh.scheduler_address).instances) == NUM_WORKERS,
        what="a new worker to register",
    )


def test_kill_9_of_stage_0_fails_over_and_members_reload(kmesh, reference_engine):
    members = _names(kmesh)[:2]
    requests = workload(6, 91, 900)
    expected = reference_tokens(reference_engine, requests)

    def during():
        drop(kmesh, members)
        time.sleep(0.5)
        next(w for w in kmesh.workers if w.name == members[0]).kill()

    tokens = run_streams(kmesh, requests, "kill-leader", during)
    assert tokens == expected
    follower = next(w for w in kmesh.workers if w.name == members[1])
    report = wait_until(
        lambda: (r := worker_load(follower.address)).load.group_id == "" and r,
        what="the surviving member to serve alone again",
    )
    assert (report.layer_start, report.layer_end) == (0, 4)
    wait_until(
        lambda: (
            members[0]
            not in {i.info.instance_id for i in cluster_state(kmesh.scheduler_address).instances}
        ),
        what="the dead member's lease to expire",
    )
    kmesh.add_worker()
    wait_until(
        lambda: len(cluster_state(kmesh.scheduler_address).instances) == NUM_WORKERS,
        what="a new worker to register",
    )


@pytest.mark.parametrize("num_stages", [2, 4])
def test_requests_arriving_during_the_drop_and_the_restore_are_exact(
    kmesh, reference_engine, num_stages
):
    """A request every 50 ms from before the drop until after the restore: some land
    while members are dropping, in the pipeline, while it dissolves, and after."""
    members = _names(kmesh)[:num_stages]
    requests = workload(8, 70 + num_stages, 60)
    expected = reference_tokens(reference_engine, requests)
    stop = threading.Event()
    outcome = {}

    def operate():
        try:
            time.sleep(0.3)
            group = drop(kmesh, members).group
            time.sleep(0.8)
            outcome["restore"] = restore(kmesh, group.group_id)
            time.sleep(0.3)
        finally:
            stop.set()

    operator = threading.Thread(target=operate)
    operator.start()
    tokens = trickle(kmesh, requests, f"trickle-{num_stages}", 0.05, stop)
    operator.join()
    assert outcome["restore"].restore_ms > 0
    assert len(tokens) >= 2 * len(requests)
    assert tokens == [expected[i % len(requests)] for i in range(len(tokens))]
