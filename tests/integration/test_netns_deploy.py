"""Multi-host deployment, shown with network namespaces: head + two worker "machines".

bench/_netns_mesh.py starts every service in its own namespace with the image's
entrypoint and the environment docker-compose resolves from deploy/compose/head.yaml
and worker.yaml (so this breaks if those files drift), the hosts joined by veth pairs
through a bridge and shaped to 10 Gb/s with tc tbf. UCX is pinned to TCP on eth0.

Checked: generations and a live migration between the two worker hosts give exactly
the tokens an unmoved local engine gives; the migration's KV crossed the source's
link (its veth counters grew by at least the bytes the migration reports, while the
head saw only control traffic); every worker advertised its host's address; the
containers' healthcheck command passes inside a namespace; afterwards every block is
free and the block managers' integrity checks pass. Namespaces and processes are
removed even when the test fails.
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
from pathlib import Path

import grpc
import pytest

from bench._checkpoint import llama_config, write_checkpoint
from bench._netns import unavailable_reason
from bench._netns_mesh import ENTRYPOINT, NetnsMesh
from gateway.client import AsyncClient
from protos import worker_pb2, worker_pb2_grpc
from services.common.config import load_config
from services.worker.engine import EngineConfig, LLMEngine, SamplingParams
from tests.integration.conftest import cluster_state, wait_until, wait_worker_idle, worker_load

pytestmark = [
    pytest.mark.netns,
    pytest.mark.timeout(600),
    pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason())),
]
MODEL_NAME = "netns-model"


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    """A host directory of checkpoints, mounted at /models as compose does. The model
    has 16 KiB of KV per token (4 layers x 8 KV heads x 64 dims x K,V x fp32), so a
    migrated request's KV dwarfs the control traffic on the links."""
    root = tmp_path_factory.mktemp("models")
    config = llama_config(
        num_layers=4, hidden_size=256, num_heads=8, num_kv_heads=8, head_dim=64,
        intermediate_size=512, max_position_embeddings=4096,
    )  # fmt: skip
    write_checkpoint(root / MODEL_NAME, config)
    return root


@pytest.fixture(scope="module")
def mesh(tmp_path_factory, models_dir):
    mesh = NetnsMesh(
        log_dir=tmp_path_factory.mktemp("netns"),
        env={
            "MODEL_DIR": str(models_dir),
            "MODEL": f"/models/{MODEL_NAME}",
            "MEMORY_CAPACITY": "384MiB",
        },
        worker_args=("--torch-threads", "1"),
        scheduler_args=("--migration-policy", "none"),  # only the test migrates
        rate="10gbit",
    )
    try:
        yield mesh.start()
    finally:
        mesh.stop()
    assert [p.name for p in mesh.processes() if p.is_alive()] == []


@pytest.fixture(scope="module")
def reference(models_dir):
    engine = LLMEngine.from_config(
        load_config(
            EngineConfig,
            "ENGINE",
            {"model": str(models_dir / MODEL_NAME), "memory_capacity_bytes": 384 * 2**20},
        )
    )

    def tokens(prompt: list[int], **sampling) -> list[int]:
        engine.add_request(f"ref-{random.random()}", prompt, SamplingParams(**sampling))
        out: list[int] = []
        while engine.has_unfinished_requests():
            for output in engine.step():
                out += output.new_token_ids
        return out

    return tokens


def prompt(seed: int, length: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(256) for _ in range(length)]


def infos(mesh: NetnsMesh) -> dict:
    return {i.info.instance_id: i.info for i in cluster_state(mesh.scheduler_address).instances}


def test_workers_advertise_their_hosts_and_pass_the_image_healthcheck(mesh):
    registered = infos(mesh)
    assert {k: v.address for k, v in registered.items()} == {
        "w1": f"{mesh.hosts.address('w1')}:50061",
        "w2": f"{mesh.hosts.address('w2')}:50061",
    }
    assert all(v.transport_address.startswith(b"ucx:") for v in registered.values())
    for worker in mesh.workers:
        result = subprocess.run(
            [*mesh.hosts.exec_prefix(worker.name), str(ENTRYPOINT), "healthcheck"],
            env={**os.environ, "LLMESH_RUN_DIR": str(worker.ready_file.parent),
                 "LLMESH_ENTRYPOINT_PYTHON": os.sys.executable},
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert (result.returncode, result.stdout.strip()) == (
            0,
            f"{mesh.hosts.address(worker.name)}:50061: SERVING",
        ), result.stderr


async def _stream(client: AsyncClient, request_id: str, prompt_ids, sampling, log) -> None:
    async for chunk in client.generate_stream(
        prompt_token_ids=prompt_ids, request_id=request_id, **sampling
    ):
        log.append((chunk.instance_id, list(chunk.token_ids)))


def _migrate(src, dst, request_id: str) -> worker_pb2.MigrationResult:
    with grpc.insecure_channel(src.address) as channel:
        reply = worker_pb2_grpc.WorkerStub(channel).MigrateOut(
            worker_pb2.MigrateOutRequest(
                dst_instance_id=dst.instance_id,
                dst_address=dst.address,
                dst_transport_address=dst.transport_address,
                request_id=request_id,
                num_requests=1,
                wait=True,
                mode=worker_pb2.MIGRATION_MODE_LIVE,
            ),
            timeout=180,
        )
    [result] = reply.results
    return result


def _running_on(registered, request_id: str) -> str:
    def find():
        for instance_id, info in registered.items():
            if request_id in {r.request_id for r in worker_load(info.address).load.running}:
                return instance_id
        return None

    return wait_until(find, 60, 0.05, f"{request_id} running somewhere")


def test_live_migration_between_hosts_goes_over_the_link_with_exact_tokens(mesh, reference):
    workload = {
        "moved": (prompt(1, 2000), dict(max_tokens=1500, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True)),
        "stays": (prompt(2, 64), dict(max_tokens=300, ignore_eos=True)),
    }  # fmt: skip
    expected = {rid: reference(p, **s) for rid, (p, s) in workload.items()}
    registered = infos(mesh)
    logs: dict[str, list] = {rid: [] for rid in workload}

    async def run() -> worker_pb2.MigrationResult:
        async with AsyncClient(mesh.gateway_address, timeout_s=300) as client:
            tasks = [
                asyncio.create_task(_stream(client, rid, p, s, logs[rid]))
                for rid, (p, s) in workload.items()
            ]
            await asyncio.to_thread(
                wait_until, lambda: len(logs["moved"]) >= 4, 120, 0.02, "first tokens"
            )
            src = await asyncio.to_thread(_running_on, registered, "moved")
            dst = "w2" if src == "w1" else "w1"
            before = {h: mesh.hosts.tx_bytes(h) for h in ("head", src)}
            head_rx = mesh.hosts.rx_bytes("head")
            result = await asyncio.to_thread(_migrate, registered[src], registered[dst], "moved")
            moved = {h: mesh.hosts.tx_bytes(h) - before[h] for h in before}
            await asyncio.gather(*tasks)
            head_rx = mesh.hosts.rx_bytes("head") - head_rx
            return result, src, dst, moved, head_rx

    result, src, dst, sent, head_rx = asyncio.run(run())
    assert result.status == worker_pb2.MIGRATION_STATUS_COMMITTED, result.reason
    for rid, chunks in logs.items():
        assert [t for _, ids in chunks for t in ids] == expected[rid], rid
    hosts_seen = [instance for instance, _ in logs["moved"]]
    assert hosts_seen[0] == src and hosts_seen[-1] == dst
    # ~2000 tokens x 16 KiB of KV crossed src's veth: at least what the migration
    # reports; the head (scheduler, gateway) only got tokens and reports meanwhile.
    assert result.num_bytes >= 2000 * 16 * 1024
    assert sent[src] >= result.num_bytes
    assert head_rx < result.num_bytes // 4
    for info in registered.values():
        report = wait_worker_idle(info.address, timeout_s=30)
        assert report.integrity_error == "", info.instance_id
        load = report.load
        assert (load.num_running, load.num_waiting, load.num_used_blocks) == (0, 0, 0)
