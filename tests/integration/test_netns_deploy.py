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
import sys
from pathlib import Path

import pytest

from bench._checkpoint import llama_config, write_checkpoint
from bench._netns import unavailable_reason
from bench._netns_mesh import ENTRYPOINT, NetnsMesh
from gateway.client import AsyncClient
from protos import worker_pb2
from services.common.config import load_config
from services.worker.engine import EngineConfig, LLMEngine
from tests.integration.conftest import (
    cluster_state,
    reference_tokens,
    wait_until,
    wait_worker_idle,
)
from tests.integration.test_migration import migrate, running_on

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
def local_engine(models_dir) -> LLMEngine:
    """The unmoved local engine the mesh must agree with (its kernels chosen as the
    workers' are: the default, on the same machine)."""
    return LLMEngine.from_config(
        load_config(
            EngineConfig,
            "ENGINE",
            {"model": str(models_dir / MODEL_NAME), "memory_capacity_bytes": 384 * 2**20},
        )
    )


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
                 "LLMESH_ENTRYPOINT_PYTHON": sys.executable},
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


def test_live_migration_between_hosts_goes_over_the_link_with_exact_tokens(mesh, local_engine):
    workload = {
        "moved": (prompt(1, 2000), dict(max_tokens=1500, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True)),
        "stays": (prompt(2, 64), dict(max_tokens=300, ignore_eos=True)),
    }  # fmt: skip
    tokens = reference_tokens(local_engine, list(workload.values()))
    expected = dict(zip(workload, tokens, strict=True))
    registered = infos(mesh)
    logs: dict[str, list] = {rid: [] for rid in workload}

    async def run():
        async with AsyncClient(
            mesh.gateway_address, timeout_s=300, api_key=mesh.gateway_api_key
        ) as client:
            tasks = [
                asyncio.create_task(_stream(client, rid, p, s, logs[rid]))
                for rid, (p, s) in workload.items()
            ]
            await asyncio.to_thread(
                wait_until, lambda: len(logs["moved"]) >= 4, 120, 0.02, "first tokens"
            )
            src = await asyncio.to_thread(running_on, registered, "moved")
            dst = "w2" if src == "w1" else "w1"
            sent_before, received_before = mesh.hosts.tx_bytes(src), mesh.hosts.rx_bytes(dst)
            head_rx = mesh.hosts.rx_bytes("head")
            [result] = await asyncio.to_thread(migrate, registered[src], registered[dst], "moved")
            moved = (
                mesh.hosts.tx_bytes(src) - sent_before,
                mesh.hosts.rx_bytes(dst) - received_before,
            )
            await asyncio.gather(*tasks)
            head_rx = mesh.hosts.rx_bytes("head") - head_rx
            return result, src, dst, moved, head_rx

    result, src, dst, (sent, received), head_rx = asyncio.run(run())
    assert result.status == worker_pb2.MIGRATION_STATUS_COMMITTED, result.reason
    for rid, chunks in logs.items():
        assert [t for _, ids in chunks for t in ids] == expected[rid], rid
    hosts_seen = [instance for instance, _ in logs["moved"]]
    assert hosts_seen[0] == src and hosts_seen[-1] == dst
    # ~2000 tokens x 16 KiB of KV left src over its veth and entered dst over its own
    # (at least what the migration reports); the head (scheduler, gateway) only got
    # tokens and load reports meanwhile.
    assert result.num_bytes >= 2000 * 16 * 1024
    assert sent >= result.num_bytes and received >= result.num_bytes
    assert head_rx < result.num_bytes // 4
    for info in registered.values():
        report = wait_worker_idle(info.address, timeout_s=30)
        assert report.integrity_error == "", info.instance_id
        load = report.load
        assert (load.num_running, load.num_waiting, load.num_used_blocks) == (0, 0, 0)
