"""Gateway failover with real processes: a client whose gateway is SIGKILLed mid-stream
resumes on another gateway (Gateway.Resume through the SDK) and gets exactly the tokens
of an undisturbed run; a request that finished while no gateway held it is still
delivered; one nobody resumes is given up after the window, and nothing leaks.

The module runs its own mesh (scheduler + 2 workers whose owner window is short) and,
per test, two gateways of its own ("a", killed; "b", the failover), stopped by PID.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import grpc
import pytest

from gateway.client import AsyncClient, Client, GatewayError
from protos import worker_pb2, worker_pb2_grpc
from services.common.grpc_client import cluster_channel
from services.common.procs import LocalMesh, start_service, stop_all, wait_for_instances
from tests.integration.conftest import (
    cluster_state,
    log_events,
    reference_tokens,
    wait_until,
    wait_worker_idle,
)

pytestmark = pytest.mark.timeout(300)
TIMEOUT_S = 120.0
OWNER_WINDOW_S = 4.0  # the workers' owner_unreachable_s: also the retention window


@pytest.fixture(scope="module")
def failover_mesh(tmp_path_factory):
    mesh = LocalMesh(
        log_dir=tmp_path_factory.mktemp("failover"),
        num_workers=2,
        # Migrations only when a test orders one; each pauses before its commit.
        scheduler_args=("--migration-policy", "none"),
        env={
            "LLMESH_WORKER_TORCH_THREADS": "1",
            "LLMESH_WORKER_OWNER_UNREACHABLE_S": str(OWNER_WINDOW_S),
            "LLMESH_TEST_HOOKS": "tests.integration.hooks.pause_before_commit",
            # The destination's reservation outlives that pause.
            "LLMESH_WORKER_MIGRATION_LEASE_S": "30",
        },
    )
    mesh.start()
    yield mesh
    mesh.stop()


@pytest.fixture
def gateways(failover_mesh, tmp_path):
    """Two fresh gateways on the module's mesh: (a, b)."""
    procs = [
        start_service(
            "gateway",
            [
                "--bind",
                "127.0.0.1:0",
                "--http-bind",
                "127.0.0.1:0",
                "--scheduler",
                failover_mesh.scheduler_address,
                "--model",
                "tiny",
            ],
            log_dir=tmp_path,
            name=f"gateway-{name}",
        )  # fmt: skip
        for name in ("a", "b")
    ]
    try:
        for proc in procs:
            proc.wait_ready()
            wait_for_instances(proc.address, 2)
        yield procs
    finally:
        stop_all(procs)
    for worker in failover_mesh.live_workers():  # nothing leaked, whatever happened
        report = wait_worker_idle(worker.address, timeout_s=OWNER_WINDOW_S + 20)
        assert report.integrity_error == "", f"{worker.name}: {report.integrity_error}"
        load = report.load
        assert (load.num_running, load.num_waiting, load.num_used_blocks) == (0, 0, 0)


def workload(n: int, max_tokens: int) -> list[tuple[list[int], dict]]:
    return [
        (
            [(13 * i + j) % 250 for j in range(5 + i)],
            {"max_tokens": max_tokens, "ignore_eos": True, "seed": 300 + i,
             "temperature": 0.0 if i % 2 else 0.8},
        )
        for i in range(n)
    ]  # fmt: skip


def flatten(chunks) -> list[int]:
    """The tokens of one stream; no chunk repeats or skips an index."""
    indices = [c.first_token_index for c in chunks]
    assert indices == [sum(len(c.token_ids) for c in chunks[:k]) for k in range(len(chunks))]
    return [t for c in chunks for t in c.token_ids]


def test_the_sdk_resumes_on_the_other_gateway_without_gap_or_duplicate(gateways, reference_engine):
    a, b = gateways
    requests = workload(4, max_tokens=1500)
    expected = reference_tokens(reference_engine, requests)

    async def scenario():
        async with AsyncClient(
            a.address, timeout_s=TIMEOUT_S, failover_addresses=[b.address]
        ) as client:
            streams = [
                client.generate_stream(prompt_token_ids=p, request_id=f"fo-{i}", **s)
                for i, (p, s) in enumerate(requests)
            ]
            received = [[await anext(stream)] for stream in streams]  # every stream began
            a.kill()  # SIGKILL the gateway by its PID: no goodbye to anyone

            async def drain(stream, chunks):
                async for chunk in stream:
                    chunks.append(chunk)

            await asyncio.gather(*(drain(s, c) for s, c in zip(streams, received, strict=True)))
            return received

    received = asyncio.run(scenario())
    assert [flatten(chunks) for chunks in received] == expected
    assert [chunks[-1].finish_reason for chunks in received] == ["length"] * 4
    assert {chunks[0].request_id for chunks in received} == {f"fo-{i}" for i in range(4)}
    # Each stream went on at gateway b, by Resume from the index it had reached.
    resumed = {e["request_id"] for e in log_events(b.log_path) if e["event"] == "request_resumed"}
    assert resumed == {f"fo-{i}" for i in range(4)}


def test_a_request_that_finished_while_no_gateway_held_it_is_still_delivered(
    gateways, failover_mesh, reference_engine
):
    a, b = gateways
    [(prompt, sampling)] = workload(1, max_tokens=400)
    [expected] = reference_tokens(reference_engine, [(prompt, sampling)])
    with Client(a.address, timeout_s=TIMEOUT_S) as client:
        stream = client.generate_stream(prompt_token_ids=prompt, request_id="detached", **sampling)
        first = next(stream)
        a.kill()
        with pytest.raises(GatewayError) as failed:
            list(stream)
        assert failed.value.code == grpc.StatusCode.UNAVAILABLE
    # The request runs to its end with nobody to send to; its blocks are freed then.
    for worker in failover_mesh.live_workers():
        wait_worker_idle(worker.address)
    seen = len(first.token_ids)
    with Client(b.address, timeout_s=TIMEOUT_S) as client:
        with pytest.raises(GatewayError) as beyond:
            list(client.resume_stream("detached", 10_000))
        assert beyond.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "next_index=10000" in beyond.value.details
        rest = list(client.resume_stream("detached", seen))
    assert rest[0].first_token_index == seen
    assert list(first.token_ids) + [t for c in rest for t in c.token_ids] == expected
    assert rest[-1].finish_reason == "length"
    # Kept (token ids only) for the window after it finished, then released.
    wait_until(lambda: not_found(b.address, "detached"), OWNER_WINDOW_S + 20, 0.5)
    assert not_found(b.address, "never-seen")


def not_found(gateway_address: str, request_id: str) -> bool:
    """Resume answers NOT_FOUND naming the request id (False if it resumed)."""
    with Client(gateway_address, timeout_s=TIMEOUT_S) as client:
        try:
            list(client.resume_stream(request_id, 0))
        except GatewayError as exc:
            assert exc.code == grpc.StatusCode.NOT_FOUND, exc
            assert repr(request_id) in exc.details
            return True
    return False


def test_an_unresumed_request_is_aborted_after_the_window_and_nothing_leaks(
    gateways, failover_mesh
):
    a, b = gateways
    requests = workload(4, max_tokens=1900)
    ids = [f"orphan-{i}" for i in range(4)]
    with Client(a.address, timeout_s=TIMEOUT_S) as client:
        streams = [
            client.generate_stream(prompt_token_ids=p, request_id=request_id, **s)
            for request_id, (p, s) in zip(ids, requests, strict=True)
        ]
        holders = {next(stream).instance_id for stream in streams}
        a.kill()
    workers = [w for w in failover_mesh.live_workers() if w.name in holders]
    owner = a.ready_info["address"]

    def noticed(worker) -> bool:
        return any(
            e["event"] == "output_stream_failed" and e["owner"] == owner
            for e in log_events(worker.log_path)
        )

    # Freeze each holder once it noticed the dead gateway, for longer than the window:
    # the requests cannot run to their end meanwhile, so the window's end finds them
    # unfinished (without the freeze a fast machine finishes them first).
    for worker in workers:
        wait_until(lambda w=worker: noticed(w), what=f"{worker.name} noticing the dead gateway")
        os.kill(worker.pid, signal.SIGSTOP)
    try:
        time.sleep(OWNER_WINDOW_S + 1)
    finally:
        for worker in workers:
            os.kill(worker.pid, signal.SIGCONT)

    def ends():
        found = {
            e["request_id"]: e["finish_reason"]
            for w in workers
            for e in log_events(w.log_path)
            if e.get("request_id") in ids and e["event"] == "request_finished"
        }
        return found if len(found) == len(ids) else None

    assert wait_until(ends, what="every orphan's end") == dict.fromkeys(ids, "abort")
    gone = [e for w in workers for e in log_events(w.log_path) if e["event"] == "owner_gone"]
    assert sum(e["num_requests"] for e in gone if e["owner"] == owner) == len(ids)
    for worker in workers:
        wait_worker_idle(worker.address)  # the fixture checks blocks and integrity
    with Client(b.address, timeout_s=TIMEOUT_S) as client:
        for request_id in ids:
            with pytest.raises(GatewayError) as missing:
                list(client.resume_stream(request_id, 0))
            assert missing.value.code == grpc.StatusCode.NOT_FOUND
            assert repr(request_id) in missing.value.details


def test_a_request_resumed_while_it_migrates_follows_it_to_its_destination(
    gateways, failover_mesh, reference_engine
):
    a, b = gateways
    [(prompt, sampling)] = workload(1, max_tokens=1900)
    [expected] = reference_tokens(reference_engine, [(prompt, sampling)])
    infos = {
        i.info.instance_id: i.info for i in cluster_state(failover_mesh.scheduler_address).instances
    }
    procs = {w.name: w for w in failover_mesh.live_workers()}

    def migrate(src, dst) -> list:
        with cluster_channel(src.address) as channel:
            reply = worker_pb2_grpc.WorkerStub(channel).MigrateOut(
                worker_pb2.MigrateOutRequest(
                    dst_instance_id=dst.instance_id,
                    dst_address=dst.address,
                    dst_transport_address=dst.transport_address,
                    request_id="mover",
                    wait=True,
                    # Stopped at once: the pause before the commit finds it unfinished.
                    mode=worker_pb2.MIGRATION_MODE_BLOCKING_COPY,
                ),
                timeout=TIMEOUT_S,
            )
        return [(r.request_id, r.status) for r in reply.results]

    def paused(proc) -> bool:
        return any(e["event"] == "migration_fault_paused" for e in log_events(proc.log_path))

    async def scenario():
        async with AsyncClient(
            a.address, timeout_s=TIMEOUT_S, failover_addresses=[b.address]
        ) as client:
            stream = client.generate_stream(prompt_token_ids=prompt, request_id="mover", **sampling)
            chunks = [await anext(stream)]
            src = chunks[0].instance_id
            [dst] = set(infos) - {src}
            migration = asyncio.create_task(asyncio.to_thread(migrate, infos[src], infos[dst]))
            await asyncio.to_thread(
                wait_until, lambda: paused(procs[src]), what="the paused commit"
            )
            a.kill()  # the client resumes on b while the request is between its workers
            async for chunk in stream:
                chunks.append(chunk)
            return src, dst, chunks, await migration

    src, dst, chunks, results = asyncio.run(scenario())
    assert results == [("mover", worker_pb2.MIGRATION_STATUS_COMMITTED)]
    assert flatten(chunks) == expected
    # Resumed at b from the source; the destination's tokens reached b (the migration
    # carried the new owner), and the stream ends there.
    resumed = [e for e in log_events(b.log_path, "mover") if e["event"] == "request_resumed"]
    assert [e["instance_id"] for e in resumed] == [src]
    assert (chunks[-1].instance_id, chunks[-1].finish_reason) == (dst, "length")


def test_worker_rehome_names_bad_fields_and_answers_not_here(failover_mesh):
    worker = failover_mesh.live_workers()[0]
    with cluster_channel(worker.address) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        for request, field in [
            (worker_pb2.RehomeRequest(owner_address="127.0.0.1:1"), "request_id"),
            (worker_pb2.RehomeRequest(request_id="r"), "owner_address"),
            (worker_pb2.RehomeRequest(request_id="r", owner_address="nowhere"), "owner_address"),
            (
                worker_pb2.RehomeRequest(
                    request_id="r", owner_address="127.0.0.1:1", next_index=-1
                ),
                "next_index",
            ),
        ]:
            with pytest.raises(grpc.RpcError) as refused:
                stub.Rehome(request, timeout=TIMEOUT_S)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert refused.value.details().startswith(field)
        reply = stub.Rehome(
            worker_pb2.RehomeRequest(request_id="not-here", owner_address="127.0.0.1:1"),
            timeout=TIMEOUT_S,
        )
    assert (reply.found, reply.instance_id) == (False, worker.name)
