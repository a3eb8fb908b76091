"""The scheduler's live control loops against real worker processes.

- Migration loop: a flood lands on the only worker; once a second one registers, the
  scheduler migrates running requests to it on its own (no admin call), and every
  request still produces exactly the local engine's tokens.
- Auto-scaling: a scheduler with `--autoscale` starts its first worker itself, adds one
  under a flood, and drains and stops one once the flood is over, losing nothing.

Workers get a 64-block KV pool so that a few 400-token requests overload one.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from gateway.client import AsyncClient
from services.common.procs import LocalMesh
from tests.integration.conftest import (
    cluster_state,
    reference_tokens,
    wait_until,
    wait_worker_idle,
    worker_load,
)

pytestmark = pytest.mark.slow

KV_BLOCKS = 64
WORKER_FLAGS = ("--torch-threads", "1", "--num-kv-blocks", str(KV_BLOCKS), "--log-level", "INFO")
NUM_REQUESTS = 12
# The floods below must outlast a new worker's start (seconds) for the scheduler to
# move requests onto it: twice the requests, as the engine decodes 12 too fast for that.
FLOOD_REQUESTS = 2 * NUM_REQUESTS
STREAM_TIMEOUT_S = 240.0


def _workload(num_requests: int = NUM_REQUESTS) -> list[tuple[list[int], dict]]:
    return [
        (
            [(7 * i + 3 * j) % 256 for j in range(24 + i)],
            {
                "max_tokens": 300 + 10 * i,
                "temperature": 0.0,
                "ignore_eos": True,
            },
        )
        for i in range(num_requests)
    ]


async def _flood(address: str, workload, while_running=None):
    """Stream every request at once; returns (tokens, instances that served chunks) each.
    `while_running` (a coroutine function) runs alongside and its result is returned too."""
    async with AsyncClient(address, timeout_s=STREAM_TIMEOUT_S) as client:

        async def one(prompt, sampling):
            tokens: list[int] = []
            instances: list[str] = []
            async for chunk in client.generate_stream(prompt_token_ids=prompt, **sampling):
                assert chunk.first_token_index == len(tokens)  # contiguous, never repeated
                tokens.extend(chunk.token_ids)
                if chunk.token_ids and (not instances or instances[-1] != chunk.instance_id):
                    instances.append(chunk.instance_id)
            return tokens, instances

        streams = asyncio.gather(*(one(p, s) for p, s in workload))
        side = asyncio.create_task(while_running()) if while_running else None
        results = await streams
        return results, (await side if side else None)


def _assert_exact(results, expected) -> None:
    """Every request's tokens equal the local engine's; else say where they part."""
    wrong = []
    for i, ((tokens, hops), want) in enumerate(zip(results, expected, strict=True)):
        if tokens != want:
            at = next(
                (k for k, (a, b) in enumerate(zip(tokens, want, strict=False)) if a != b), None
            )
            wrong.append(
                f"request {i}: {len(tokens)} vs {len(want)} tokens, first difference at "
                f"{at}, served by {hops}"
            )
    assert not wrong, "\n".join(wrong)


def _instances(scheduler_address: str) -> dict[str, str]:
    """instance id -> address, as the scheduler sees them."""
    try:
        state = cluster_state(scheduler_address)
    except grpc.RpcError:
        return {}
    return {i.info.instance_id: i.info.address for i in state.instances}


def _assert_left_clean(addresses) -> None:
    for address in addresses:
        report = wait_worker_idle(address)
        assert report.integrity_error == "" and report.is_integrity_checked
        load = report.load
        assert (load.num_running, load.num_waiting, load.num_used_blocks) == (0, 0, 0)


def test_scheduler_migrates_a_flood_off_an_overloaded_worker(tmp_path, reference_engine):
    workload = _workload(FLOOD_REQUESTS)
    expected = reference_tokens(reference_engine, workload)
    with LocalMesh(
        log_dir=tmp_path,
        num_workers=1,
        worker_args=WORKER_FLAGS,
        scheduler_args=("--migration-interval-s", "0.05"),
    ) as mesh:
        flooded = mesh.workers[0]

        async def add_worker_once_overloaded():
            # The flood is dispatched while worker-0 is alone: it must be overloaded
            # (negative freeness: more demand than KV) before the second worker comes.
            await asyncio.to_thread(
                wait_until,
                lambda: worker_load(flooded.address).load.freeness < 0,
                60.0,
                what="worker-0 overloaded",
            )
            assert cluster_state(mesh.scheduler_address).num_migrations_ordered == 0
            # Forked from this (main) thread, which outlives the worker: a thread that
            # exits would take it along (PR_SET_PDEATHSIG, see procs.py).
            worker = mesh.add_worker(wait=False)
            await asyncio.to_thread(worker.wait_ready, 120.0)
            return worker

        results, added = asyncio.run(
            _flood(mesh.gateway_address, workload, add_worker_once_overloaded)
        )

        _assert_exact(results, expected)
        state = cluster_state(mesh.scheduler_address)
        assert state.migration_policy == "freeness"
        assert state.num_migrations_ordered >= 1
        # Requests were moved off worker-0 mid-stream and finished on worker-1.
        moved = [hops for _, hops in results if hops[:2] == ["worker-0", added.name]]
        assert moved, [hops for _, hops in results]
        _assert_left_clean([w.address for w in mesh.live_workers()])


def test_autoscale_adds_a_worker_under_load_and_drains_it_afterwards(tmp_path, reference_engine):
    workload = _workload(FLOOD_REQUESTS)
    expected = reference_tokens(reference_engine, workload)
    mesh = LocalMesh(
        log_dir=tmp_path,
        num_workers=0,  # the scheduler's provisioner starts every worker
        wait_instances=1,
        scheduler_args=(
            "--autoscale",
            "--min-instances",
            "1",
            "--max-instances",
            "2",
            "--scaling-interval-s",
            "0.2",
            "--scaling-cooldown-s",
            "2",
            "--scale-up-freeness",
            "4",
            "--scale-down-freeness",
            "40",
            "--worker-args",
            " ".join(WORKER_FLAGS),
            "--worker-log-dir",
            str(tmp_path / "workers"),
        ),  # fmt: skip
    )
    with mesh:
        assert sorted(_instances(mesh.scheduler_address)) == ["auto-0"]
        seen: dict[str, str] = {}

        async def watch_the_fleet():
            # Until the flood ends: remember every instance that registered.
            while True:
                seen.update(_instances(mesh.scheduler_address))
                await asyncio.sleep(0.1)

        async def flood_and_watch():
            watcher = asyncio.create_task(watch_the_fleet())
            try:
                return await _flood(mesh.gateway_address, workload)
            finally:
                watcher.cancel()

        results, _ = asyncio.run(flood_and_watch())

        _assert_exact(results, expected)
        assert sorted(seen) == ["auto-0", "auto-1"]
        served = {hop for _, hops in results for hop in hops}
        assert served == {"auto-0", "auto-1"}
        # Load over: one instance drained and stopped; the other stays (min_instances).
        wait_until(
            lambda: len(_instances(mesh.scheduler_address)) == 1,
            60.0,
            what="scale-down to one instance",
        )
        state = cluster_state(mesh.scheduler_address)
        assert state.autoscale
        assert (state.num_instances_started, state.num_instances_stopped) == (2, 1)
        assert list(state.draining_instance_ids) == list(state.pending_instance_ids) == []
        [survivor] = _instances(mesh.scheduler_address)
        [stopped] = set(seen) - {survivor}
        # The stopped worker's process is gone: its port no longer answers.
        with pytest.raises(grpc.RpcError):
            worker_load(seen[stopped])
        _assert_left_clean([seen[survivor]])
        # And the fleet serves on.
        again, _ = asyncio.run(_flood(mesh.gateway_address, workload[:2]))
        _assert_exact(again, expected[:2])
    # The scheduler stopped the worker it had started.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            worker_load(seen[survivor])
        except grpc.RpcError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"{survivor} still answers after the mesh stopped")
