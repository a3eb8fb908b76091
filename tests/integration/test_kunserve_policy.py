"""The KunServe policy on real processes: a flood overloads KV on both workers, the
scheduler's group loop drops them into a group by itself, and restores the group once
the flood has drained; every request's tokens are exactly those of one unloaded
engine, and afterwards both workers serve alone, idle, with every block free.

A mesh of its own (2 workers with a small pool, the scheduler on `--policy kunserve`
with short windows), so its automatic drops never touch the other tests' workers.
"""

from __future__ import annotations

from services.common.procs import LocalMesh
from tests.integration.conftest import (
    cluster_state,
    log_events,
    reference_tokens,
    wait_until,
    wait_worker_idle,
    worker_load,
)
from tests.integration.kunserve_helpers import run_streams

# Short windows so that the test runs in seconds; the vote threshold a little under the
# default so that a report taken right after a request finished does not reset a vote.
POLICY_ARGS = (
    "--policy", "kunserve",
    "--group-interval-s", "0.1",
    "--group-vote-demand-at-least", "0.9",
    "--group-vote-window-s", "0.3",
    "--group-sizes", "2",
    "--group-hold-s", "1",
    "--group-restore-window-s", "0.5",
)  # fmt: skip


def flood(num: int) -> list[tuple[list[int], dict]]:
    """Prompts of 300-449 tokens, 200-299 new tokens each (greedy and seeded). Spread
    over two workers of 639 blocks, the prompts alone fill nearly 90% of each pool, and
    the requests need about 1.5 times the pool by their end: KV stays overloaded for
    most of the run, whatever the speed of the machine. Their group holds 1.3 times the
    pools (the weights are 38% of a worker's memory)."""
    return [
        (
            [(11 * i + 5 * j) % 256 for j in range(300 + (37 * i) % 150)],
            {
                "max_tokens": 200 + (53 * i) % 100,
                "ignore_eos": True,
                "seed": 500 + i,
                "temperature": 0.0 if i % 2 else 0.8,
            },
        )
        for i in range(num)
    ]


def test_a_flood_makes_the_scheduler_drop_a_group_and_restore_it_after(tmp_path, reference_engine):
    requests = flood(48)
    expected = reference_tokens(reference_engine, requests)
    with LocalMesh(
        log_dir=tmp_path,
        num_workers=2,
        scheduler_args=POLICY_ARGS,
        env={
            "LLMESH_WORKER_TORCH_THREADS": "1",
            "LLMESH_WORKER_ENGINE_MEMORY_CAPACITY_BYTES": str(32 << 20),
        },
    ) as mesh:
        state = cluster_state(mesh.scheduler_address)
        assert (state.dispatch_policy, state.migration_policy, state.group_policy) == (
            "load_balance",
            "none",
            "kunserve",
        )
        pool_blocks = worker_load(mesh.workers[0].address).load.num_total_blocks
        names = sorted(w.name for w in mesh.workers)

        def until_a_group_forms():
            # Or until the flood is over without one (the assertion below says so).
            wait_until(
                lambda: (
                    cluster_state(mesh.scheduler_address).num_groups_dropped >= 1
                    or all(_is_idle(w.address) for w in mesh.workers)
                ),
                timeout_s=600.0,
                interval_s=0.1,
                what="the scheduler to drop a group by itself",
            )

        tokens = run_streams(mesh, requests, "flood", until_a_group_forms)
        assert tokens == expected
        assert cluster_state(mesh.scheduler_address).num_groups_dropped >= 1

        # The flood is over: the group restores by itself.
        state = wait_until(
            lambda: (
                (s := cluster_state(mesh.scheduler_address)).num_groups_restored
                == s.num_groups_dropped
                and not s.groups
                and s
            ),
            timeout_s=120.0,
            what="the scheduler to restore every group it dropped",
        )
        assert state.num_groups_dropped >= 1
        assert state.num_group_operations_failed == 0

        events = log_events(mesh.scheduler.log_path)
        decided = [e for e in events if e["event"] == "group_drop_decided"]
        serving = [e for e in events if e["event"] == "group_serving"]
        restore_decided = [e for e in events if e["event"] == "group_restore_decided"]
        restored = [e for e in events if e["event"] == "group_restored"]
        assert [sorted(e["members"]) for e in decided] == [names] * state.num_groups_dropped
        assert all(e["reason"].startswith("drop g=2: ") for e in decided)
        assert len(serving) == state.num_groups_dropped
        assert [e["group_id"] for e in restore_decided] == [e["group_id"] for e in serving]
        assert [e["group_id"] for e in restored] == [e["group_id"] for e in serving]
        assert all(e["reason"].startswith(f"restore {e['group_id']}: ") for e in restore_decided)

        # Every worker alone with all its layers, idle, clean, its whole pool back.
        for worker in mesh.workers:
            report = wait_until(
                lambda w=worker: (r := worker_load(w.address)).load.group_id == "" and r,
                what=f"{worker.name} to serve alone",
            )
            assert (report.layer_start, report.layer_end) == (0, 4)
            report = wait_worker_idle(worker.address)
            assert report.is_integrity_checked
            assert report.integrity_error == "", f"{worker.name}: {report.integrity_error}"
            load = report.load
            assert (load.num_running, load.num_waiting, load.num_used_blocks) == (0, 0, 0)
            assert load.num_total_blocks == pool_blocks
    assert [p.name for p in mesh.processes() if p.is_alive()] == []


def _is_idle(address: str) -> bool:
    load = worker_load(address).load
    return (load.num_running, load.num_waiting) == (0, 0)
