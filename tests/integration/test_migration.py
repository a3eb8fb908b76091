"""Live migration across real worker processes, streamed through the gateway.

A synthetic checkpoint with a 4k context (built here) lets requests carry thousands of
tokens. Every test checks the exact token stream against an unmoved local run, and
afterwards that every live worker is idle with all blocks free and integrity intact.
"""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import grpc
import httpx
import pytest

from bench._checkpoint import llama_config, write_checkpoint
from gateway.client import AsyncClient
from protos import scheduler_pb2, scheduler_pb2_grpc, worker_pb2, worker_pb2_grpc
from services.common.config import load_config
from services.common.grpc_client import cluster_channel
from services.common.procs import LocalMesh
from services.worker.engine import EngineConfig, LLMEngine, SamplingParams
from tests.integration.conftest import (
    cluster_state,
    log_events,
    wait_until,
    wait_worker_idle,
    worker_load,
)

pytestmark = pytest.mark.timeout(300)
TIMEOUT_S = 180.0
# These tests order migrations one after another while requests decode, so requests
# must outlive them: on this 2-layer, 128-wide model the native kernels decode a
# thousand tokens in about a second, the torch kernels in several. Workers and the
# reference engine both run the torch kernels (the two round differently).
KERNELS = "torch"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    config = llama_config(
        num_layers=2, hidden_size=128, num_heads=4, num_kv_heads=2, head_dim=32,
        intermediate_size=256, max_position_embeddings=4096,
    )  # fmt: skip
    return write_checkpoint(tmp_path_factory.mktemp("model"), config)


def _mesh(
    tmp_path_factory, model_dir, name: str, worker_args: tuple[str, ...], env=None
) -> LocalMesh:
    return LocalMesh(
        log_dir=tmp_path_factory.mktemp(name),
        num_workers=2,
        model=str(model_dir),
        worker_args=("--memory-capacity-bytes", "128MiB", *worker_args),
        # These tests order every migration themselves (admin RPC / CLI); the
        # scheduler's own loop is tested in test_scheduling_loops.py.
        scheduler_args=("--migration-policy", "none"),
        env={"LLMESH_WORKER_TORCH_THREADS": "1", "LLMESH_KERNELS": KERNELS, **(env or {})},
    ).start()


@pytest.fixture(scope="module")
def mesh2(tmp_path_factory, model_dir):
    # Stages in transfers of 16 blocks (16 KiB each here), so long contexts take many.
    mesh = _mesh(
        tmp_path_factory, model_dir, "migration", ("--migration-stage-chunk-bytes", "0.25MiB")
    )
    yield mesh
    mesh.stop()


@pytest.fixture(scope="module")
def fault_mesh(tmp_path_factory, model_dir):
    mesh = _mesh(
        tmp_path_factory,
        model_dir,
        "migration-faults",
        ("--migration-lease-s", "1.5"),
        env={"LLMESH_TEST_HOOKS": "tests.integration.hooks.pause_before_commit"},
    )
    yield mesh
    mesh.stop()


@pytest.fixture(scope="module")
def timeout_mesh(tmp_path_factory, model_dir):
    """Every migration's first stage is sent under the wrong transfer id."""
    mesh = LocalMesh(
        log_dir=tmp_path_factory.mktemp("migration-timeout"),
        num_workers=2,
        model=str(model_dir),
        worker_args=("--memory-capacity-bytes", "128MiB"),
        scheduler_args=("--migration-policy", "none"),
        env={
            "LLMESH_WORKER_TORCH_THREADS": "1",
            "LLMESH_WORKER_MIGRATION_TRANSFER_TIMEOUT_S": "1.5",
            "LLMESH_WORKER_MIGRATION_LEASE_S": "1.5",
            "LLMESH_TEST_HOOKS": "tests.integration.hooks.misdirect_first_stage",
        },
    ).start()
    yield mesh
    mesh.stop()


@pytest.fixture(scope="module")
def reference(model_dir):
    engine = LLMEngine.from_config(
        load_config(
            EngineConfig,
            "ENGINE",
            {"model": str(model_dir), "memory_capacity_bytes": 256 * 2**20, "kernels": KERNELS},
        )
    )

    def tokens(prompt: list[int], **sampling) -> list[int]:
        engine.add_request("ref", prompt, SamplingParams(**sampling))
        out: list[int] = []
        while engine.has_unfinished_requests():
            for o in engine.step():
                out += o.new_token_ids
        return out

    return tokens


def assert_clean(mesh: LocalMesh) -> None:
    for worker in mesh.live_workers():
        report = wait_worker_idle(worker.address, timeout_s=30)
        assert report.integrity_error == "", f"{worker.name}: {report.integrity_error}"
        load = report.load
        assert (load.num_running, load.num_waiting, load.num_used_blocks) == (0, 0, 0), worker.name


def prompt(seed: int, length: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(256) for _ in range(length)]


def instances(mesh: LocalMesh, num_instances: int = 2) -> dict[str, object]:
    """The registered instances' infos, once num_instances have registered."""

    def infos():
        found = {
            i.info.instance_id: i.info for i in cluster_state(mesh.scheduler_address).instances
        }
        return found if len(found) >= num_instances else None

    return wait_until(infos, 60, 0.1, f"{num_instances} registered instances")


def migrate(
    src, dst, request_id: str = "", mode: int = worker_pb2.MIGRATION_MODE_LIVE
) -> list[worker_pb2.MigrationResult]:
    with cluster_channel(src.address) as channel:
        reply = worker_pb2_grpc.WorkerStub(channel).MigrateOut(
            worker_pb2.MigrateOutRequest(
                dst_instance_id=dst.instance_id,
                dst_address=dst.address,
                dst_transport_address=dst.transport_address,
                request_id=request_id,
                num_requests=1,
                wait=True,
                mode=mode,
            ),
            timeout=TIMEOUT_S,
        )
    return list(reply.results)


def running_on(infos, request_id: str) -> str:
    """The instance whose running batch holds request_id (waits out a prefill)."""

    def find():
        for instance_id, info in infos.items():
            if request_id in {r.request_id for r in worker_load(info.address).load.running}:
                return instance_id
        return None

    return wait_until(find, 60, 0.05, f"{request_id} running somewhere")


async def collect(stream) -> list:
    return [chunk async for chunk in stream]


def flatten(chunks) -> list[int]:
    indices = [c.first_token_index for c in chunks]
    assert indices == [sum(len(c.token_ids) for c in chunks[:k]) for k in range(len(chunks))]
    return [t for c in chunks for t in c.token_ids]


def test_requests_migrate_back_and_forth_with_exact_tokens(mesh2, reference):
    workload = {
        "long-greedy": (prompt(1, 3000), dict(max_tokens=1000, ignore_eos=True)),
        "long-seeded": (prompt(2, 2500), dict(max_tokens=1000, temperature=0.8, top_p=0.9, seed=11, ignore_eos=True)),
        "short-seeded": (prompt(3, 40), dict(max_tokens=1500, temperature=1.0, top_k=40, seed=12, ignore_eos=True)),
    }  # fmt: skip
    expected = {rid: reference(p, **s) for rid, (p, s) in workload.items()}

    async def scenario():
        async with AsyncClient(mesh2.gateway_address, timeout_s=TIMEOUT_S) as client:
            streams = {
                rid: client.generate_stream(prompt_token_ids=p, request_id=rid, **s)
                for rid, (p, s) in workload.items()
            }
            firsts = {rid: await anext(stream) for rid, stream in streams.items()}
            tasks = {rid: asyncio.create_task(collect(s)) for rid, s in streams.items()}
            infos = instances(mesh2)
            results = []
            for _hop in range(3):  # every request moves to the other worker, three times
                for rid in workload:
                    here = await asyncio.to_thread(running_on, infos, rid)
                    there = next(w for w in infos if w != here)
                    results += await asyncio.to_thread(migrate, infos[here], infos[there], rid)
            rest = {rid: await task for rid, task in tasks.items()}
            return firsts, rest, results

    firsts, rest, results = asyncio.run(scenario())
    assert [r.status for r in results] == [worker_pb2.MIGRATION_STATUS_COMMITTED] * 9, [
        (r.request_id, r.reason) for r in results
    ]
    assert all(r.num_stages >= 1 and r.num_blocks > 0 for r in results)
    long_moves = [r for r in results if r.request_id.startswith("long")]
    assert all(r.num_blocks >= 2500 // 16 for r in long_moves)
    assert all(r.num_stages >= r.num_blocks // 16 for r in long_moves)  # 16 blocks a transfer
    for rid in workload:
        chunks = [firsts[rid], *rest[rid]]
        assert flatten(chunks) == expected[rid], rid
        assert chunks[-1].finish_reason == "length"
        assert len({c.instance_id for c in chunks if c.token_ids}) == 2  # seen from both
    assert_clean(mesh2)


def test_scheduler_ordered_migration_and_cli(mesh2, reference):
    p, s = prompt(4, 200), dict(max_tokens=600, temperature=0.7, seed=5, ignore_eos=True)
    expected = reference(p, **s)

    async def scenario():
        async with AsyncClient(mesh2.gateway_address, timeout_s=TIMEOUT_S) as client:
            stream = client.generate_stream(prompt_token_ids=p, request_id="ordered", **s)
            first = await anext(stream)
            task = asyncio.create_task(collect(stream))
            src = first.instance_id
            dst = next(w for w in instances(mesh2) if w != src)
            with cluster_channel(mesh2.scheduler_address) as channel:
                reply = scheduler_pb2_grpc.SchedulerStub(channel).Migrate(
                    scheduler_pb2.SchedulerMigrateRequest(
                        src_instance_id=src, dst_instance_id=dst, request_id="ordered"
                    ),
                    timeout=10,
                )
            assert reply.ordered
            return src, dst, [first, *await task]

    src, dst, chunks = asyncio.run(scenario())
    assert flatten(chunks) == expected
    producers = [c.instance_id for c in chunks if c.token_ids]
    assert producers[0] == src and producers[-1] == dst
    assert cluster_state(mesh2.scheduler_address).num_migrations_ordered >= 1
    assert_clean(mesh2)


def _paused(worker) -> bool:
    return any(e.get("event") == "migration_fault_paused" for e in log_events(worker.log_path))


@pytest.mark.parametrize("victim_role", ["source", "destination"])
def test_kill_9_during_migration_loses_nothing(fault_mesh, reference, victim_role):
    p, s = prompt(7, 1500), dict(max_tokens=500, temperature=0.6, seed=21, ignore_eos=True)
    expected = reference(p, **s)
    rid = f"kill-{victim_role}"

    async def scenario():
        async with AsyncClient(fault_mesh.gateway_address, timeout_s=TIMEOUT_S) as client:
            stream = client.generate_stream(prompt_token_ids=p, request_id=rid, **s)
            first = await anext(stream)
            task = asyncio.create_task(collect(stream))
            infos = instances(fault_mesh)
            src = first.instance_id
            dst = next(w for w in infos if w != src)
            procs = {w.name: w for w in fault_mesh.live_workers()}
            migration = asyncio.create_task(asyncio.to_thread(migrate, infos[src], infos[dst], rid))
            await asyncio.to_thread(
                wait_until,
                lambda: _paused(procs[src]),
                60,
                0.05,
                "the source to pause before commit",
            )
            victim = procs[src] if victim_role == "source" else procs[dst]
            victim.kill()
            if victim_role == "destination":
                (result,) = await migration
                assert result.status == worker_pb2.MIGRATION_STATUS_ABORTED
                assert result.reason.startswith("destination_unreachable")
            else:
                with pytest.raises(grpc.RpcError):
                    await migration
            return [first, *await task], victim, procs

    chunks, victim, procs = asyncio.run(scenario())
    assert flatten(chunks) == expected
    assert chunks[-1].finish_reason == "length"
    survivor = next(w for name, w in procs.items() if w is not victim)
    # The survivor holds nothing for the dead peer: no reservation, no request, no block.
    load = wait_worker_idle(survivor.address, timeout_s=30).load
    assert (load.num_used_blocks, load.num_migrating) == (0, 0)
    fault_mesh.workers.remove(victim)
    fault_mesh.add_worker()
    instances(fault_mesh)  # the replacement registered
    assert_clean(fault_mesh)


def _stream_and_migrate(mesh: LocalMesh, rid: str, p, s, pick_dst=None):
    """Stream rid through the gateway; once it produced a token, order one live migration
    from its instance to the other (or pick_dst(infos, src)). Returns (chunks, results)."""

    async def scenario():
        async with AsyncClient(mesh.gateway_address, timeout_s=TIMEOUT_S) as client:
            stream = client.generate_stream(prompt_token_ids=p, request_id=rid, **s)
            first = await anext(stream)
            task = asyncio.create_task(collect(stream))
            infos = instances(mesh)
            src = first.instance_id
            dst = next(w for w in infos if w != src)
            results = await asyncio.to_thread(migrate, infos[src], infos[dst], rid)
            return [first, *await task], results, src

    return asyncio.run(scenario())


def _set_draining(mesh: LocalMesh, instance_id: str, is_terminating: bool) -> None:
    with cluster_channel(mesh.scheduler_address) as channel:
        reply = scheduler_pb2_grpc.SchedulerStub(channel).Drain(
            scheduler_pb2.SchedulerDrainRequest(
                instance_id=instance_id, is_terminating=is_terminating
            ),
            timeout=10,
        )
    assert reply.sent

    def reported():
        state = cluster_state(mesh.scheduler_address)
        return any(
            i.info.instance_id == instance_id and i.load.is_terminating == is_terminating
            for i in state.instances
        )

    wait_until(reported, 20, 0.05, f"{instance_id} to report is_terminating={is_terminating}")


def test_draining_destination_refuses_and_the_request_stays(mesh2, reference):
    p, s = prompt(8, 300), dict(max_tokens=300, temperature=0.7, seed=31, ignore_eos=True)
    expected = reference(p, **s)
    infos = instances(mesh2)
    drained = sorted(infos)[1]
    _set_draining(mesh2, drained, True)
    try:
        chunks, results, src = _stream_and_migrate(mesh2, "to-draining", p, s)
    finally:
        _set_draining(mesh2, drained, False)
    assert src != drained  # dispatch avoided the draining instance
    [result] = results
    assert result.status == worker_pb2.MIGRATION_STATUS_ABORTED
    assert result.reason.startswith("destination_refused") and "draining" in result.reason
    assert flatten(chunks) == expected
    assert {c.instance_id for c in chunks if c.token_ids} == {src}
    assert_clean(mesh2)


def test_data_plane_timeout_aborts_and_the_request_completes_once(timeout_mesh, reference):
    p, s = prompt(9, 800), dict(max_tokens=300, temperature=0.9, seed=41, ignore_eos=True)
    expected = reference(p, **s)
    chunks, results, src = _stream_and_migrate(timeout_mesh, "lost-stage", p, s)
    [result] = results
    assert result.status == worker_pb2.MIGRATION_STATUS_ABORTED
    assert result.reason.startswith(("transfer_failed", "commit_refused")), result.reason
    assert flatten(chunks) == expected
    assert chunks[-1].finish_reason == "length"
    assert {c.instance_id for c in chunks if c.token_ids} == {src}
    # The destination gave its reservation back (abort or lease): nothing held anywhere.
    assert_clean(timeout_mesh)


async def _sse_events(lines) -> list[dict | str]:
    """The data of each SSE event until [DONE] (included as the string "[DONE]")."""
    events: list[dict | str] = []
    async for line in lines:
        if line.startswith("data: "):
            payload = line[len("data: ") :]
            events.append("[DONE]" if payload == "[DONE]" else json.loads(payload))
            if payload == "[DONE]":
                break
    return events


def test_http_sse_stream_stays_whole_across_migrations(mesh2, reference):
    """The OpenAI API's stream of a request moved twice: every token once, in order."""
    p, s = prompt(5, 300), dict(max_tokens=1200, temperature=0.9, seed=21, ignore_eos=True)
    expected = reference(p, **s)
    body = {"model": mesh2.model, "prompt": p, "stream": True, "return_token_ids": True, **s}

    async def scenario():
        url = f"http://{mesh2.gateway_http_address}/v1/completions"
        async with (
            httpx.AsyncClient(timeout=TIMEOUT_S) as client,
            client.stream("POST", url, json=body) as response,
        ):
            assert response.status_code == 200
            lines = response.aiter_lines()
            first = None
            async for line in lines:
                if line.startswith("data: "):
                    first = json.loads(line[len("data: ") :])
                    break
            rest = asyncio.create_task(_sse_events(lines))
            request_id = f"{first['id']}-0"  # choice 0's request on the mesh
            infos = instances(mesh2)
            results = []
            for _hop in range(2):
                here = await asyncio.to_thread(running_on, infos, request_id)
                there = next(w for w in infos if w != here)
                results += await asyncio.to_thread(migrate, infos[here], infos[there], request_id)
            return [first, *await rest], results

    events, results = asyncio.run(scenario())
    assert [r.status for r in results] == [worker_pb2.MIGRATION_STATUS_COMMITTED] * 2
    *chunks, done = events
    assert done == "[DONE]"
    assert [t for c in chunks for t in c["choices"][0]["token_ids"]] == expected
    assert all(c["choices"][0]["token_ids"] for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks][-2:] == [None, "length"]
    assert_clean(mesh2)
