"""Real processes on loopback: a scheduler, a gateway and workers, ports chosen by the OS.

One mesh is shared by the whole integration session (starting processes that import
torch is the slow part on a 2-core box); tests that kill a process restore the mesh
before they end. After every test each live worker must be idle with all its KV blocks
free and its block manager's integrity check passing.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from protos import scheduler_pb2, scheduler_pb2_grpc, worker_pb2, worker_pb2_grpc
from services.common.config import load_config
from services.common.convert import load_from_proto
from services.common.grpc_client import cluster_channel
from services.common.messages import LoadReport
from services.common.procs import LocalMesh
from services.worker.engine import EngineConfig, LLMEngine, SamplingParams

RPC_TIMEOUT_S = 5.0
NUM_WORKERS = 2


@pytest.fixture(scope="session")
def mesh(tmp_path_factory) -> LocalMesh:
    log_dir = tmp_path_factory.mktemp("mesh")
    mesh = LocalMesh(
        log_dir=log_dir,
        num_workers=NUM_WORKERS,
        # 2 shared cores: one torch thread per worker keeps them from fighting.
        env={"LLMESH_WORKER_TORCH_THREADS": "1"},
    )
    mesh.start()
    yield mesh
    mesh.stop()
    leftovers = [p.name for p in mesh.processes() if p.is_alive()]
    assert leftovers == [], f"processes still alive after stop: {leftovers}"


@pytest.fixture(autouse=True)
def _mesh_left_clean(request):
    """Every worker idle, all blocks free, block manager integrity OK after each test."""
    yield
    if "mesh" not in request.fixturenames:
        return
    mesh: LocalMesh = request.getfixturevalue("mesh")
    for worker in mesh.live_workers():
        report = wait_worker_idle(worker.address)
        assert report.is_integrity_checked
        assert report.integrity_error == "", f"{worker.name}: {report.integrity_error}"
        load = report.load
        assert (load.num_running, load.num_waiting, load.num_used_blocks) == (0, 0, 0)


def worker_load(address: str, check_integrity: bool = False) -> LoadReport:
    with cluster_channel(address) as channel:
        reply = worker_pb2_grpc.WorkerStub(channel).GetLoad(
            worker_pb2.GetLoadRequest(check_integrity=check_integrity), timeout=RPC_TIMEOUT_S
        )
    # The mesh's workers run the default block size (a load report does not carry it).
    return load_from_proto(reply, EngineConfig().block_size)


def wait_worker_idle(address: str, timeout_s: float = 20.0) -> LoadReport:
    """The worker's load (with the integrity check) once it is idle."""
    deadline = time.monotonic() + timeout_s
    while True:
        report = worker_load(address, check_integrity=True)
        load = report.load
        is_idle = (load.num_running, load.num_waiting, load.num_used_blocks) == (0, 0, 0)
        if is_idle or time.monotonic() > deadline:
            return report
        time.sleep(0.05)


def cluster_state(scheduler_address: str) -> scheduler_pb2.ClusterState:
    with cluster_channel(scheduler_address) as channel:
        return scheduler_pb2_grpc.SchedulerStub(channel).GetClusterState(
            scheduler_pb2.GetClusterStateRequest(), timeout=RPC_TIMEOUT_S
        )


def wait_until(
    predicate, timeout_s: float = 20.0, interval_s: float = 0.05, what: str = "condition"
):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def log_events(log_path: Path, request_id: str | None = None) -> list[dict]:
    """The JSON log lines of one service (optionally of one request)."""
    events = []
    for line in log_path.read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if request_id is None or event.get("request_id") == request_id:
            events.append(event)
    return events


@pytest.fixture(scope="session")
def reference_engine() -> LLMEngine:
    """The local engine the mesh must agree with, token for token.

    Loaded like the workers' engines, so `LLMESH_KERNELS` picks the same kernels here.
    """
    return LLMEngine.from_config(load_config(EngineConfig, "ENGINE", {"model": "tiny"}))


def reference_tokens(engine: LLMEngine, requests: list[tuple[list[int], dict]]) -> list[list[int]]:
    """Run (prompt ids, sampling kwargs) pairs together on the local engine."""
    ids = [f"ref-{time.monotonic_ns()}-{i}" for i in range(len(requests))]
    for request_id, (prompt, sampling) in zip(ids, requests, strict=True):
        engine.add_request(request_id, list(prompt), SamplingParams(**sampling))
    tokens: dict[str, list[int]] = {request_id: [] for request_id in ids}
    while engine.has_unfinished_requests():
        for output in engine.step():
            tokens[output.request_id].extend(output.new_token_ids)
    return [tokens[request_id] for request_id in ids]
