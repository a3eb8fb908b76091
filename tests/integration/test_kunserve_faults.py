"""KunServe members killed (kill -9) while the KV exchange runs and while a restore
runs: the survivors end alone with every layer, every request finishes with exactly
the tokens of one unloaded engine, and no block leaks.

Each test runs a 2-worker mesh of its own whose workers pause at the phase under test
(tests/integration/hooks/pause_group_*.py), so the kill lands inside it.
"""

from __future__ import annotations

import signal
import threading
import time

import grpc
import pytest

from services.common.procs import LocalMesh
from tests.integration.conftest import (
    cluster_state,
    log_events,
    reference_tokens,
    wait_until,
    wait_worker_idle,
    worker_load,
)
from tests.integration.kunserve_helpers import drop, restore, run_streams, workload


def _mesh(tmp_path, hooks: str) -> LocalMesh:
    return LocalMesh(
        log_dir=tmp_path,
        num_workers=2,
        env={
            "LLMESH_WORKER_TORCH_THREADS": "1",
            "LLMESH_WORKER_ENGINE_MEMORY_CAPACITY_BYTES": str(32 << 20),
            "LLMESH_TEST_HOOKS": f"tests.integration.hooks.{hooks}",
            "LLMESH_SCHEDULER_GROUP_POLICY": "none",  # groups only when the test says
        },
    )


def _paused(worker, point: str) -> bool:
    return any(
        e["event"] == "kunserve_fault_paused" and e.get("point") == point
        for e in log_events(worker.log_path)
    )


def _survivor_alone_and_clean(mesh: LocalMesh, survivor) -> None:
    report = wait_until(
        lambda: (r := worker_load(survivor.address)).load.group_id == "" and r,
        what="the survivor to serve alone",
    )
    assert (report.layer_start, report.layer_end) == (0, 4)
    report = wait_worker_idle(survivor.address)
    assert report.integrity_error == ""
    load = report.load
    assert (load.num_running, load.num_waiting, load.num_used_blocks) == (0, 0, 0)
    wait_until(
        lambda: not cluster_state(mesh.scheduler_address).groups,
        what="the scheduler to forget the group",
    )


@pytest.mark.parametrize("victim_stage", [1, 0])
def test_kill_9_during_the_kv_exchange(tmp_path, reference_engine, victim_stage):
    requests = workload(6, 13 + victim_stage, 900)
    expected = reference_tokens(reference_engine, requests)
    with _mesh(tmp_path, "pause_group_exchange") as mesh:
        members = [w.name for w in mesh.workers]

        def during():
            drop(mesh, members)  # answers once the capacity is usable; the exchange waits
            wait_until(
                lambda: any(_paused(w, "exchange") for w in mesh.workers),
                what="an exchange to pause",
            )
            mesh.workers[victim_stage].kill()

        tokens = run_streams(mesh, requests, f"exchange-kill-{victim_stage}", during)
        assert tokens == expected
        _survivor_alone_and_clean(mesh, mesh.workers[1 - victim_stage])


@pytest.mark.parametrize("victim_stage", [1, 0])
def test_kill_9_during_the_restore(tmp_path, reference_engine, victim_stage):
    requests = workload(6, 29 + victim_stage, 900)
    expected = reference_tokens(reference_engine, requests)
    with _mesh(tmp_path, "pause_group_restore") as mesh:
        members = [w.name for w in mesh.workers]
        outcome = {}

        def during():
            group = drop(mesh, members).group
            time.sleep(0.5)

            def kill_when_paused():
                wait_until(
                    lambda: any(_paused(w, "restore") for w in mesh.workers),
                    what="the restore to pause",
                )
                mesh.workers[victim_stage].kill()

            killer = threading.Thread(target=kill_when_paused)
            killer.start()
            try:
                outcome["restore"] = restore(mesh, group.group_id)
            except Exception as exc:  # stage 0 killed: the scheduler's call fails
                outcome["error"] = exc
            killer.join()

        tokens = run_streams(mesh, requests, f"restore-kill-{victim_stage}", during)
        assert tokens == expected
        if victim_stage == 0:
            assert "error" in outcome
        else:
            # Stage 0 finished the restore alone: the dead member's requests resumed
            # elsewhere through their gateway, stage 0 kept its own.
            assert outcome["restore"].restore_ms > 0
        _survivor_alone_and_clean(mesh, mesh.workers[1 - victim_stage])


def test_requests_going_home_at_a_restore_stream_their_first_tokens_there(
    tmp_path, reference_engine
):
    """Each member pauses after its engine took the requests going home there (it steps
    them meanwhile): the tokens of those first steps reach the gateway (a regression:
    the owner used to be registered after the import, and those tokens went nowhere,
    leaving the stream waiting for a gap forever)."""
    requests = workload(6, 41, 600)
    expected = reference_tokens(reference_engine, requests)
    with _mesh(tmp_path, "pause_after_restore_import") as mesh:
        members = [w.name for w in mesh.workers]
        outcome = {}

        def during():
            group = drop(mesh, members).group
            time.sleep(0.5)
            outcome["restore"] = restore(mesh, group.group_id)

        tokens = run_streams(mesh, requests, "restore-home", during)
        assert tokens == expected
        assert outcome["restore"].num_requests_moved > 0
        assert all(_paused(w, "after_restore_import") for w in mesh.workers)
        for worker in mesh.workers:
            _survivor_alone_and_clean(mesh, worker)


def _drop_fails_tokens_exact(mesh, reference_engine, offset: int, prefix: str):
    """Streams 6 requests and drops both workers meanwhile: the drop must fail with
    FAILED_PRECONDITION (returned) and every request finish with its reference tokens."""
    requests = workload(6, offset, 900)
    expected = reference_tokens(reference_engine, requests)
    members = [w.name for w in mesh.workers]
    outcome = {}

    def during():
        with pytest.raises(grpc.RpcError) as failed:
            drop(mesh, members)
        outcome["error"] = failed.value

    assert run_streams(mesh, requests, prefix, during) == expected
    error = outcome["error"]
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error
    return error


def test_a_member_dying_before_its_exchange_fails_the_drop_by_name(tmp_path, reference_engine):
    """Stage 1 joins, then dies when told to start its exchange: the drop answers
    FAILED_PRECONDITION naming the stage (it used to answer UNKNOWN), the group breaks
    up, and every request finishes exactly on the survivor."""
    with _mesh(tmp_path, "kill_at_exchange_start") as mesh:
        error = _drop_fails_tokens_exact(mesh, reference_engine, 53, "exchange-start-kill")
        assert "KV exchange failed to start: stage 1: UNAVAILABLE" in error.details()
        assert mesh.workers[1].popen.poll() == -signal.SIGKILL
        _survivor_alone_and_clean(mesh, mesh.workers[0])


def test_stage_0_failing_its_own_join_sends_the_member_home_with_its_requests(
    tmp_path, reference_engine
):
    """Stage 1 joins (layers dropped, requests handed to stage 0), then stage 0's own
    join fails: the drop answers FAILED_PRECONDITION, stage 1 reloads its layers and
    takes its requests back (they used to be lost, stage 1 left as a group of one),
    stage 0 keeps its own, and every request finishes exactly on the two workers alone."""
    with _mesh(tmp_path, "fail_stage0_join") as mesh:
        error = _drop_fails_tokens_exact(mesh, reference_engine, 57, "stage0-join-fails")
        assert "injected: stage 0 cannot join" in error.details()
        joined = [e for e in log_events(mesh.workers[1].log_path) if e["event"] == "group_joined"]
        assert [e["stage"] for e in joined] == [1]  # it had joined before stage 0 failed
        for worker in mesh.workers:
            _survivor_alone_and_clean(mesh, worker)
