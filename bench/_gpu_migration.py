"""The device check's live migration: two worker processes on the one device (plus
scheduler and gateway), a request moved from one to the other mid-decode, its tokens
compared with the same request left alone (on either worker: both are alike).

The workers run the torch kernels on `device` (each process its own CUDA context on
the one GPU); KV leaves the source's device memory and enters the destination's through
the engine's staging buffers, over the data plane: UCX where ucxx is installed, else the
TCP data plane (a GPU machine given only a small wheelhouse: docs/gpu.md).
"""

from __future__ import annotations

import asyncio
import importlib.util
import random
import tempfile
from pathlib import Path

from bench._migration_processes import _migrate_out
from gateway.client import AsyncClient
from protos import scheduler_pb2, scheduler_pb2_grpc
from services.common.grpc_client import aio_channel
from services.common.procs import LocalMesh


def data_plane() -> str:
    """ "ucx" where ucxx imports here, else "tcp"."""
    return "ucx" if importlib.util.find_spec("ucxx") is not None else "tcp"


async def _generate(client: AsyncClient, request_id: str, prompt: list[int], n: int, seen):
    """Streams a request; `seen` gets (token id, instance id) per token as they come."""
    async for chunk in client.generate_stream(
        prompt_token_ids=prompt, request_id=request_id, max_tokens=n, ignore_eos=True
    ):
        seen.extend((token, chunk.instance_id) for token in chunk.token_ids)


async def _wait(seen: list, count: int, task: asyncio.Task, timeout_s: float = 300) -> None:
    for _ in range(int(timeout_s / 0.005)):
        if len(seen) >= count:
            return
        if task.done():
            task.result()  # raises what ended it
            raise RuntimeError(f"the stream ended after {len(seen)} tokens, before {count}")
        await asyncio.sleep(0.005)
    raise TimeoutError(f"no {count} tokens in {timeout_s} s")


async def _check(mesh: LocalMesh, prompt: list[int], max_tokens: int) -> dict:
    async with aio_channel(mesh.scheduler_address) as channel:
        state = await scheduler_pb2_grpc.SchedulerStub(channel).GetClusterState(
            scheduler_pb2.GetClusterStateRequest(), timeout=5
        )
    infos = {i.info.instance_id: i.info for i in state.instances}
    async with AsyncClient(mesh.gateway_address, timeout_s=600) as client:
        alone: list[tuple[int, str]] = []
        await _generate(client, "alone", prompt, max_tokens, alone)
        moved: list[tuple[int, str]] = []
        task = asyncio.create_task(_generate(client, "moved", prompt, max_tokens, moved))
        await _wait(moved, 4, task)
        # From wherever the dispatcher put it to the other worker, while it decodes.
        a = moved[0][1]
        [b] = [i for i in infos if i != a]
        result = await _migrate_out(infos[a], infos[b], "moved", "live")
        await task
    instances = [instance for _, instance in moved]
    return {
        "migration_tokens_exact": [t for t, _ in moved] == [t for t, _ in alone],
        "migration_moved": instances[0] == a and instances[-1] == b,
        "migration_tokens": len(moved),
        "migration_downtime_ms": round(result.downtime_ms, 2),
        "migration_bytes": result.num_bytes,
        "migration_stages": result.num_stages,
    }


def run_migration_check(
    device: str, progress, max_tokens: int = 600, transport: str = "auto"
) -> dict:
    """Starts the two-worker mesh on `device`, moves one request live, stops the mesh.
    transport: the data plane, "ucx", "tcp" or "auto" (data_plane())."""
    transport = data_plane() if transport == "auto" else transport
    mesh = LocalMesh(
        log_dir=Path(tempfile.mkdtemp(prefix="llmesh-gpu-check-")),
        num_workers=2,
        model="tiny",
        worker_args=(
            "--device", device, "--kernels", "torch", "--transport-backend", transport,
            "--torch-threads", "1", "--log-level", "WARNING",
        ),
        scheduler_args=("--migration-policy", "none", "--group-policy", "none",
                        "--log-level", "WARNING"),
        gateway_args=("--log-level", "WARNING"),
    )  # fmt: skip
    progress(f"migration: 2 worker processes on {device}, data plane {transport} ({mesh.log_dir})")
    mesh.start()
    try:
        rng = random.Random(23)
        prompt = [rng.randrange(1, 256) for _ in range(100)]
        figures = asyncio.run(_check(mesh, prompt, max_tokens))
    finally:
        mesh.stop()
    return {**figures, "migration_data_plane": transport}
