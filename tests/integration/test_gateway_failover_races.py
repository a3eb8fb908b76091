"""Gateway failover in the races it must survive, with real processes:

- the request's gateway is SIGKILLed and restarted at its address while the request is
  between two workers (its source already fixed the dead gateway as owner in the
  handoff it is about to commit), and the client resumes on the other gateway;
- the request's gateway and then its worker are SIGKILLed: no worker holds it, and
  the SDK re-submits it (same seed) and skips the tokens the caller already has.

Each stream must end with exactly the tokens of an undisturbed run, not stall until
the client's deadline nor fail. The module runs its own mesh (scheduler + 2 workers
whose migrations pause once their handoff is made:
tests/integration/hooks/pause_after_handoff.py) and, per test, gateways of its own,
stopped by PID.
"""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from gateway.client import AsyncClient
from protos import worker_pb2, worker_pb2_grpc
from services.common.grpc_client import cluster_channel
from services.common.procs import LocalMesh, start_service, stop_all, wait_for_instances
from tests.integration.conftest import (
    cluster_state,
    log_events,
    reference_tokens,
    wait_until,
    wait_worker_idle,
    worker_load,
)

pytestmark = pytest.mark.timeout(300)
TIMEOUT_S = 60.0  # the client's deadline: a stalled stream ends here
OWNER_WINDOW_S = 30.0  # the workers' owner_unreachable_s: longer than the test


@pytest.fixture(scope="module")
def handoff_mesh(tmp_path_factory):
    mesh = LocalMesh(
        log_dir=tmp_path_factory.mktemp("handoff"),
        num_workers=2,
        scheduler_args=("--migration-policy", "none"),  # only the migration the test orders
        env={
            "LLMESH_WORKER_TORCH_THREADS": "1",
            "LLMESH_WORKER_OWNER_UNREACHABLE_S": str(OWNER_WINDOW_S),
            "LLMESH_TEST_HOOKS": "tests.integration.hooks.pause_after_handoff",
            "LLMESH_WORKER_MIGRATION_LEASE_S": "30",  # the reservation outlives the pause
        },
    )
    mesh.start()
    yield mesh
    mesh.stop()


def _gateway(mesh: LocalMesh, log_dir, name: str, bind: str = "127.0.0.1:0"):
    proc = start_service(
        "gateway",
        [
            "--bind",
            bind,
            "--http-bind",
            "127.0.0.1:0",
            "--scheduler",
            mesh.scheduler_address,
            "--model",
            "tiny",
        ],  # fmt: skip
        log_dir=log_dir,
        name=name,
        # A Rehome on the source waits out the paused handoff: longer than its pause.
        env={"LLMESH_GATEWAY_SUBMIT_TIMEOUT_S": "30"},
    )
    proc.wait_ready()
    wait_for_instances(proc.address, 2)
    return proc


def _migrate(src, dst, request_id: str) -> list:
    with cluster_channel(src.address) as channel:
        reply = worker_pb2_grpc.WorkerStub(channel).MigrateOut(
            worker_pb2.MigrateOutRequest(
                dst_instance_id=dst.instance_id,
                dst_address=dst.address,
                dst_transport_address=dst.transport_address,
                request_id=request_id,
                wait=True,
                # Stopped at once: the pause after the handoff finds it unfinished.
                mode=worker_pb2.MIGRATION_MODE_BLOCKING_COPY,
            ),
            timeout=TIMEOUT_S,
        )
    return [(r.request_id, r.status) for r in reply.results]


def test_a_resume_racing_a_migration_commit_reaches_the_destination(
    handoff_mesh, tmp_path, reference_engine
):
    """The race, made deterministic:

    1. gateway a's request runs on src; a migration src -> dst made its handoff (owner:
       gateway a) and pauses (the hook); gateway a is SIGKILLed and a new gateway a2
       starts at its address and serves a request on dst;
    2. the client resumes on gateway b, whose Rehome reaches src in that window;
       b is then SIGSTOPped, so anything it would do next waits;
    3. the migration commits: dst runs the request and sends its outputs to gateway
       a's address, where a2 gets them (a2 never served that request);
    4. once dst moved on (its request made 2 blocks of progress, or is gone), b goes on.

    Before the fix, src re-homed the request to b at once, dst adopted it with a as its
    owner, a2 aborted it there as an orphan, and b, following src's move notice to dst,
    found nothing there: the stream stalled until the client's deadline."""
    prompt = [(7 * j + 3) % 250 for j in range(9)]
    sampling = {"max_tokens": 1900, "ignore_eos": True, "seed": 41, "temperature": 0.8}
    [expected] = reference_tokens(reference_engine, [(prompt, sampling)])
    infos = {
        i.info.instance_id: i.info for i in cluster_state(handoff_mesh.scheduler_address).instances
    }
    workers = {w.name: w for w in handoff_mesh.live_workers()}
    procs = [
        _gateway(handoff_mesh, tmp_path, "gateway-a"),
        _gateway(handoff_mesh, tmp_path, "gateway-b"),
    ]
    a, b = procs

    def logged(proc, *events) -> bool:
        return any(e["event"] in events for e in log_events(proc.log_path, "racer"))

    def moved_on(dst, num_blocks: int) -> bool:
        used = worker_load(dst.address).load.num_used_blocks
        return used == 0 or used >= num_blocks + 2

    async def scenario():
        async with AsyncClient(
            a.address, timeout_s=TIMEOUT_S, failover_addresses=[b.address]
        ) as client:
            stream = client.generate_stream(prompt_token_ids=prompt, request_id="racer", **sampling)
            chunks = [await anext(stream)]
            src, [dst] = chunks[0].instance_id, set(infos) - {chunks[0].instance_id}
            migration = asyncio.create_task(
                asyncio.to_thread(_migrate, infos[src], infos[dst], "racer")
            )
            wait = asyncio.to_thread
            await wait(wait_until, lambda: logged(workers[src], "migration_fault_paused"))
            a.kill()  # SIGKILL by PID, then a new gateway at the same address
            a2 = await wait(_gateway, handoff_mesh, tmp_path, "gateway-a2", a.address)
            procs.append(a2)
            await _serve_through(a2, dst)  # a2 works with dst, as a serving gateway does
            consume = asyncio.create_task(_drain(stream, chunks))  # resumes on b
            await wait(
                wait_until,
                lambda: logged(workers[src], "request_rehomed", "rehome_waits_for_migration"),
                what="gateway b's Rehome at the source",
            )
            os.kill(b.pid, signal.SIGSTOP)
            try:
                [(_, status)] = await migration
                assert status == worker_pb2.MIGRATION_STATUS_COMMITTED
                [moved] = [
                    e for e in log_events(workers[src].log_path, "racer")
                    if e["event"] == "migration_finished"
                ]  # fmt: skip
                await wait(wait_until, lambda: moved_on(workers[dst], moved["num_blocks"]))
            finally:
                os.kill(b.pid, signal.SIGCONT)
            await consume
            return dst, chunks

    try:
        dst, chunks = asyncio.run(scenario())
    finally:
        stop_all(procs)
    indices = [c.first_token_index for c in chunks]
    assert indices == [sum(len(c.token_ids) for c in chunks[:k]) for k in range(len(chunks))]
    assert [t for c in chunks for t in c.token_ids] == expected
    assert (chunks[-1].instance_id, chunks[-1].finish_reason) == (dst, "length")
    for worker in handoff_mesh.live_workers():  # nothing leaked
        report = wait_worker_idle(worker.address, timeout_s=60)
        assert report.integrity_error == "", f"{worker.name}: {report.integrity_error}"
        load = report.load
        assert (load.num_running, load.num_waiting, load.num_used_blocks) == (0, 0, 0)


async def _serve_through(gateway, instance_id: str) -> None:
    """Short requests through `gateway` until one ran on instance_id."""
    async with AsyncClient(gateway.address, timeout_s=TIMEOUT_S) as client:
        for n in range(50):
            reply = client.generate_stream(prompt_token_ids=[n % 200 + 1, 2], max_tokens=2)
            if any([c.instance_id == instance_id async for c in reply]):
                return
    raise AssertionError(f"no request through {gateway.name} ran on {instance_id}")


async def _drain(stream, chunks) -> None:
    async for chunk in stream:
        chunks.append(chunk)


def test_a_request_whose_worker_and_gateway_died_is_re_submitted_with_exact_tokens(
    handoff_mesh, tmp_path, reference_engine
):
    """Its gateway and then its worker SIGKILLed mid-stream: no worker holds it, so the
    resume on gateway b finds nothing; the SDK sends the request again with the seed of
    its first chunk (the gateway chose it) and skips the tokens the caller has."""
    prompt = [(11 * j + 5) % 250 for j in range(7)]
    sampling = {"max_tokens": 1500, "ignore_eos": True, "temperature": 0.8, "top_p": 0.95}
    procs = [_gateway(handoff_mesh, tmp_path, name) for name in ("gateway-a", "gateway-b")]
    a, b = procs

    async def scenario():
        async with AsyncClient(
            a.address, timeout_s=TIMEOUT_S, failover_addresses=[b.address]
        ) as client:
            stream = client.generate_stream(prompt_token_ids=prompt, request_id="twice", **sampling)
            chunks = [await anext(stream)]
            while sum(len(c.token_ids) for c in chunks) < 40:
                chunks.append(await anext(stream))
            a.kill()  # the gateway, then the worker holding the request: by PID
            next(w for w in handoff_mesh.live_workers() if w.name == chunks[0].instance_id).kill()
            await _drain(stream, chunks)
            return chunks

    try:
        chunks = asyncio.run(scenario())
    finally:
        stop_all(procs)
    seed = chunks[0].seed
    assert seed is not None and all(c.seed is None for c in chunks[1:])
    [expected] = reference_tokens(reference_engine, [(prompt, {**sampling, "seed": seed})])
    indices = [c.first_token_index for c in chunks]
    assert indices == [sum(len(c.token_ids) for c in chunks[:k]) for k in range(len(chunks))]
    assert [t for c in chunks for t in c.token_ids] == expected
    assert chunks[-1].finish_reason == "length"
    # b found it nowhere (no request_resumed) and ran it again from its prompt.
    events = [e["event"] for e in log_events(b.log_path, "twice")]
    assert "request_resumed" not in events and events.count("request_received") == 1
    [survivor] = handoff_mesh.live_workers()
    assert chunks[-1].instance_id == survivor.name
    report = wait_worker_idle(survivor.address, timeout_s=60)
    assert report.integrity_error == ""
    load = report.load
    assert (load.num_running, load.num_waiting, load.num_used_blocks) == (0, 0, 0)
