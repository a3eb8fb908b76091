"""Admission control on a live mesh with small bounds: backpressure, shedding statuses and
retry hints over gRPC and HTTP (httpx and the official openai client), per-key limits,
and a short soak at twice the mesh's capacity (bench/soak.py) that loses nothing.

The mesh is this module's own (2 workers, running batch 2, waiting queue 2), plus a
second gateway on it with per-key limits; after each test every worker is idle with
all blocks free and its block manager's integrity check passing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import time

import grpc
import httpx
import openai
import pytest

from bench._soak_load import measure_capacity, reference_tokens, templates
from bench.soak import run_phase
from gateway.client import AsyncClient, GatewayError, build_request
from protos import gateway_pb2_grpc
from services.common.procs import LocalMesh, start_service, stop_all, wait_for_instances
from tests.integration.conftest import wait_worker_idle, worker_load

MAX_NUM_SEQS = 2
MAX_WAITING = 2
TIMEOUT_S = 60.0
LONG = {"max_tokens": 400, "temperature": 0.0, "ignore_eos": True, "seed": 0}


@pytest.fixture(scope="module")
def bounded(tmp_path_factory):
    """(mesh, limited gateway address, its HTTP address)."""
    log_dir = tmp_path_factory.mktemp("bounded")
    mesh = LocalMesh(
        log_dir=log_dir,
        num_workers=2,
        worker_args=(
            "--max-num-seqs", str(MAX_NUM_SEQS),
            "--max-waiting-requests", str(MAX_WAITING),
            "--torch-threads", "1",
        ),
    )  # fmt: skip
    mesh.start()
    limited = None
    try:
        limited = start_service(
            "gateway",
            [
                "--bind", "127.0.0.1:0",
                "--http-bind", "127.0.0.1:0",
                "--scheduler", mesh.scheduler_address,
                "--key-max-concurrent", "1",
                "--key-rate-per-s", "0.001",
                "--key-burst", "2",
            ],
            log_dir=log_dir,
            name="gateway-limited",
            env=mesh.env,  # the mesh's cluster secret, if it has its own
        )  # fmt: skip
        limited.wait_ready(120)
        wait_for_instances(limited.address, 2, 60)
        yield mesh, limited.address, limited.ready_info["http_address"]
    finally:
        if limited is not None:
            stop_all([limited])
        mesh.stop()


@pytest.fixture(autouse=True)
def _bounded_left_clean(request):
    yield
    if "bounded" not in request.fixturenames:
        return
    mesh = request.getfixturevalue("bounded")[0]
    for worker in mesh.live_workers():
        report = wait_worker_idle(worker.address, timeout_s=60)
        assert report.integrity_error == "", f"{worker.name}: {report.integrity_error}"
        load = report.load
        assert (load.num_running, load.num_waiting, load.num_used_blocks) == (0, 0, 0)


async def _burst(address: str, num: int) -> list:
    """`num` long requests at once, no client retries: each one's tokens or its error."""

    async def one(client: AsyncClient, index: int):
        try:
            return (await client.generate(prompt_token_ids=[1 + index % 7, 2, 3], **LONG)).token_ids
        except GatewayError as exc:
            return exc

    async with AsyncClient(address, timeout_s=TIMEOUT_S, retry=None) as client:
        return await asyncio.gather(*(one(client, i) for i in range(num)))


def test_a_burst_beyond_the_bounds_is_shed_with_resource_exhausted_and_a_hint(bounded):
    mesh, _, _ = bounded
    peaks = {w.name: 0 for w in mesh.workers}

    async def run():
        stop = asyncio.Event()

        async def watch():  # what each worker holds while the burst runs
            while not stop.is_set():
                for w in mesh.workers:
                    load = (await asyncio.to_thread(worker_load, w.address)).load
                    peaks[w.name] = max(peaks[w.name], load.num_waiting)
                    assert load.num_running <= MAX_NUM_SEQS

        watcher = asyncio.create_task(watch())
        try:
            return await _burst(mesh.gateway_address, 24)
        finally:
            stop.set()
            await watcher

    results = asyncio.run(run())
    shed = [r for r in results if isinstance(r, GatewayError)]
    done = [r for r in results if not isinstance(r, GatewayError)]
    assert shed and done
    assert {e.code for e in shed} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    # The workers' hint (0.2 s) when they refused Submit, what is left of it when the
    # gateway already knew both full, the gateway's (1 s) when its cached view did.
    assert all(0 < e.retry_after_s <= 0.2 or e.retry_after_s == 1.0 for e in shed)
    assert all(len(tokens) == LONG["max_tokens"] for tokens in done)
    assert max(peaks.values()) <= MAX_WAITING


def test_http_answers_429_with_retry_after_in_openai_shape(bounded):
    mesh, _, _ = bounded
    url = f"http://{mesh.gateway_http_address}/v1/completions"
    body = {"model": "tiny", "prompt": "hello", **LONG}

    async def run():
        async with httpx.AsyncClient(timeout=TIMEOUT_S) as client:
            return await asyncio.gather(*(client.post(url, json=body) for _ in range(24)))

    responses = asyncio.run(run())
    statuses = sorted({r.status_code for r in responses})
    assert statuses == [200, 429]
    for response in responses:
        if response.status_code == 429:
            assert response.headers["retry-after"] == "1"
            error = response.json()["error"]
            assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
            assert "retry later" in error["message"]
        else:
            assert response.json()["usage"]["completion_tokens"] == LONG["max_tokens"]


@contextlib.contextmanager
def workers_stopped(mesh: LocalMesh):
    """SIGSTOP this module's workers (by PID) for the body: what runs there stays put."""
    pids = [w.pid for w in mesh.workers]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


def test_per_key_concurrency_and_rate_limits(bounded):
    mesh, limited, limited_http = bounded
    key = "sk-test-one"
    bearer = (("authorization", f"Bearer {key}"),)
    with grpc.insecure_channel(limited) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        long_request = build_request(prompt_token_ids=[5, 6, 7], **{**LONG, "max_tokens": 2000})
        # One stream in flight for the key (held there: its workers are stopped once it
        # started): a second is refused at once, spending no token.
        stream = stub.Generate(long_request, metadata=bearer, timeout=TIMEOUT_S)
        assert next(stream).token_ids
        with workers_stopped(mesh), pytest.raises(grpc.RpcError) as info:
            stub.GenerateUnary(long_request, metadata=bearer, timeout=TIMEOUT_S)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "key_max_concurrent=1" in info.value.details()
        assert tuple(info.value.trailing_metadata()) == (("retry-after-ms", "1000"),)
        # Another key and no key at all are counted apart.
        other = (("authorization", "Bearer sk-test-two"),)
        short = build_request(prompt_token_ids=[5, 6, 7], max_tokens=4)
        assert len(stub.GenerateUnary(short, metadata=other, timeout=TIMEOUT_S).token_ids) == 4
        assert len(stub.GenerateUnary(short, timeout=TIMEOUT_S).token_ids) == 4
        stream.cancel()
        # The key's second token (burst 2) once the cancelled stream is released (a
        # concurrency refusal spends no token), then its rate: one per 1000 s.
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            try:
                reply = stub.GenerateUnary(short, metadata=bearer, timeout=TIMEOUT_S)
                break
            except grpc.RpcError as exc:
                assert "key_max_concurrent" in exc.details() and time.monotonic() < deadline
                time.sleep(0.05)
        assert len(reply.token_ids) == 4
        with pytest.raises(grpc.RpcError) as info:
            stub.GenerateUnary(short, metadata=bearer, timeout=TIMEOUT_S)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "key_rate_per_s=0.001" in info.value.details()
        ((name, value),) = info.value.trailing_metadata()
        assert name == "retry-after-ms" and 999_000 < int(value) <= 1_000_000
    # The same key over HTTP: 429, Retry-After the same hint in whole seconds.
    response = httpx.post(
        f"http://{limited_http}/v1/completions",
        json={"model": "tiny", "prompt": "hi", "max_tokens": 4},
        headers={"Authorization": f"Bearer {key}"},
        timeout=TIMEOUT_S,
    )
    assert (response.status_code, response.headers["retry-after"]) == (429, "1000")
    assert response.json()["error"]["code"] == "rate_limit_exceeded"
    # The official client (it retries 429 by itself unless told not to).
    api = openai.OpenAI(base_url=f"http://{limited_http}/v1", api_key=key, max_retries=0)
    with pytest.raises(openai.RateLimitError) as rate_info:
        api.completions.create(model="tiny", prompt="hi", max_tokens=4)
    assert rate_info.value.status_code == 429
    assert rate_info.value.response.headers["retry-after"] == "1000"


def test_a_short_soak_at_twice_capacity_loses_nothing(bounded):
    mesh, _, _ = bounded
    requests = templates(prompt_len=16, max_tokens=16)
    expected = asyncio.run(reference_tokens(mesh.gateway_address, requests))
    concurrency = 2 * (MAX_NUM_SEQS + MAX_WAITING) * 2
    capacity = asyncio.run(measure_capacity(mesh.gateway_address, requests, concurrency, 5.0))
    args = argparse.Namespace(seed=3)
    result = run_phase(args, mesh, requests, expected, 2 * capacity, 20.0, True, 5.0)
    assert result["lost_requests"] == 0, result["lost_reasons"]
    assert result["leaked_blocks"] == 0
    assert result["integrity_errors"] == []
    assert result["num_mismatched_tokens"] == 0
    assert set(result["shed_codes"]) <= {"RESOURCE_EXHAUSTED"}
    assert result["num_completed"] + result["num_shed"] == result["num_offered"]
    assert max(result["max_waiting_seen"].values()) <= MAX_WAITING
    # The gateway counted a first token for this phase's admitted requests (its histogram).
    assert result["gateway_p99_ttft_le_s"] is not None
