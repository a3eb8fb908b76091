"""The cross-process variant of `llmesh bench migration` (its default).

Two worker processes (plus scheduler and gateway) on loopback, the KV over UCX between
them (or, with `--hosts netns`, on two network-namespace hosts, UCX over TCP across a
10 Gb/s-shaped veth link: bench/_netns_mesh.py), every request streamed through the gateway by a client in this process. Downtime
is measured as in bench/migration.py: the source coordinator's suspend-to-adopted time
for live and blocking copy, and for recompute (and as `live_stream_gap_ms`) what the
client sees, token times being its chunk arrival times:

    stream gap = (first chunk from b - last chunk from a) - b's median inter-token interval

Requests are put on worker a by draining b while they are dispatched (dispatch avoids a
draining instance); the scheduler's own migration loop is off (`--migration-policy
none`), so only the bench moves requests, with the workers' MigrateOut admin RPC.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import tempfile
import time
from pathlib import Path

from bench._migration_figures import median_sample, move_figures, resident_since
from gateway.client import AsyncClient
from protos import scheduler_pb2, scheduler_pb2_grpc, worker_pb2, worker_pb2_grpc
from services.common.convert import migration_mode_to_proto, migration_status_from_proto
from services.common.grpc_client import aio_channel
from services.common.migration import MigrationMode, MigrationStatus
from services.common.procs import LocalMesh

NUM_BACKGROUND = 3
MODES = ("live", "blocking_copy", "recompute")


class Streams:
    """Client streams; per request id the (arrival time, instance id) of every token."""

    def __init__(self, client: AsyncClient) -> None:
        self.client = client
        self.log: dict[str, list[tuple[float, str]]] = {}
        self.tasks: list[asyncio.Task] = []

    def start(self, request_id: str, prompt: list[int], max_tokens: int) -> None:
        self.log[request_id] = []

        async def pump():
            async for chunk in self.client.generate_stream(
                prompt_token_ids=prompt, request_id=request_id, max_tokens=max_tokens,
                ignore_eos=True,
            ):  # fmt: skip
                now = time.perf_counter()
                self.log[request_id].extend([(now, chunk.instance_id)] * len(chunk.token_ids))

        self.tasks.append(asyncio.create_task(pump()))

    async def wait_tokens(self, request_id: str, count: int, timeout_s: float = 600) -> None:
        deadline = time.perf_counter() + timeout_s
        while len(self.log[request_id]) < count:
            if time.perf_counter() > deadline:
                raise TimeoutError(f"{request_id} did not reach {count} tokens")
            await asyncio.sleep(0.005)

    async def cancel_all(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.tasks.clear()


async def _migrate_out(src_info, dst_info, request_id: str, mode: str):
    async with aio_channel(src_info.address) as channel:
        reply = await worker_pb2_grpc.WorkerStub(channel).MigrateOut(
            worker_pb2.MigrateOutRequest(
                dst_instance_id=dst_info.instance_id,
                dst_address=dst_info.address,
                dst_transport_address=dst_info.transport_address,
                request_id=request_id,
                num_requests=1,
                wait=True,
                mode=migration_mode_to_proto(MigrationMode(mode)),
            ),
            timeout=600,
        )
    [result] = reply.results
    if migration_status_from_proto(result.status) is not MigrationStatus.COMMITTED:
        raise RuntimeError(f"{mode} migration of {request_id} failed: {result.reason}")
    return result


async def _set_draining(scheduler: str, instance_id: str, draining: bool) -> None:
    async with aio_channel(scheduler) as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        await stub.Drain(
            scheduler_pb2.SchedulerDrainRequest(instance_id=instance_id, is_terminating=draining),
            timeout=10,
        )
        for _ in range(400):  # until the worker's report shows it
            state = await stub.GetClusterState(scheduler_pb2.GetClusterStateRequest(), timeout=5)
            if any(
                i.info.instance_id == instance_id and i.load.is_terminating == draining
                for i in state.instances
            ):
                return
            await asyncio.sleep(0.05)
    raise TimeoutError(f"{instance_id} did not report is_terminating={draining}")


async def _move(streams: Streams, infos, a: str, b: str, rid: str, mode: str) -> dict:
    entries = streams.log[rid]
    start = len(entries)
    since = resident_since(entries, a)
    t0 = time.perf_counter()
    result = await _migrate_out(infos[a], infos[b], rid, mode)
    t1 = time.perf_counter()
    await streams.wait_tokens(rid, len(entries) + 8)
    background = [streams.log[f"bg{i}"] for i in range(NUM_BACKGROUND)]
    figures = move_figures(entries, background, start, since, t0, a, b, mode, result)
    return {**figures, "duration_ms": (t1 - t0) * 1000}


async def _measure(mesh: LocalMesh, lengths, progress, live_repeats: int) -> list[dict]:
    async with aio_channel(mesh.scheduler_address) as channel:
        state = await scheduler_pb2_grpc.SchedulerStub(channel).GetClusterState(
            scheduler_pb2.GetClusterStateRequest(), timeout=5
        )
    infos = {i.info.instance_id: i.info for i in state.instances}
    a, b = sorted(infos)
    rng = random.Random(0)
    rows = []
    async with AsyncClient(
        mesh.gateway_address, timeout_s=3600, api_key=mesh.gateway_api_key or None
    ) as client:
        for length in lengths:
            streams = Streams(client)
            await _set_draining(mesh.scheduler_address, b, True)  # everything lands on a
            for i in range(NUM_BACKGROUND):
                streams.start(f"bg{i}-{length}", [rng.randrange(256) for _ in range(32)], 3000)
                streams.log[f"bg{i}"] = streams.log[f"bg{i}-{length}"]
            rid = f"r{length}"
            streams.start(rid, [rng.randrange(256) for _ in range(length)], 3000)
            await streams.wait_tokens(rid, 8)
            await _set_draining(mesh.scheduler_address, b, False)
            entries = streams.log[rid]
            decode_step = statistics.median(
                entries[j + 1][0] - entries[j][0] for j in range(len(entries) - 6, len(entries) - 1)
            )
            row = {"context_length": length, "decode_step_ms": decode_step * 1000}
            # Unmeasured round trip: b grows its attention buffers to this length once.
            await _migrate_out(infos[a], infos[b], rid, "live")
            await streams.wait_tokens(rid, len(entries) + 2)
            await _migrate_out(infos[b], infos[a], rid, "live")
            await streams.wait_tokens(rid, len(entries) + 4)
            for mode in MODES:
                samples = []
                for _ in range(live_repeats if mode == "live" else 1):
                    samples.append(await _move(streams, infos, a, b, rid, mode))
                    if mode != "recompute":
                        await _migrate_out(infos[b], infos[a], rid, "live")  # back, unmeasured
                        await streams.wait_tokens(rid, len(entries) + 4)
                row[mode] = median_sample(samples)
                progress(
                    f"  ctx {length:5d}  {mode:13s} downtime {row[mode]['downtime_ms']:9.1f} ms"
                )
            await streams.cancel_all()
            rows.append(row)
    return rows


NETNS_RATE = "10gbit"  # tc tbf on every namespace host's link: a 10 Gb/s-class network


def _mesh(hosts: str, model_dir: Path, max_len: int):
    """Two workers (plus scheduler and gateway): as processes on this host, or one per
    network-namespace host started from the compose files (bench/_netns_mesh.py)."""
    log_dir = Path(tempfile.mkdtemp(prefix=f"llmesh-bench-migration-{hosts}-"))
    engine_args = (
        "--torch-threads", "1", "--max-model-len", str(max_len),
        "--max-num-batched-tokens", "1024", "--log-level", "WARNING",
    )  # fmt: skip
    scheduler_args = ("--migration-policy", "none", "--group-policy", "none", "--log-level", "WARNING")  # fmt: skip
    gateway_args = ("--log-level", "WARNING")
    if hosts == "netns":
        from bench._netns_mesh import NetnsMesh

        return NetnsMesh(
            log_dir=log_dir,
            # The checkpoint's directory is the hosts' model directory, mounted at /models.
            env={
                "MODEL_DIR": str(model_dir.parent),
                "MODEL": f"/models/{model_dir.name}",
                "MEMORY_CAPACITY": "2GiB",
            },
            worker_args=engine_args,
            scheduler_args=scheduler_args,
            gateway_args=gateway_args,
            rate=NETNS_RATE,
        )
    return LocalMesh(
        log_dir=log_dir,
        num_workers=2,
        model=str(model_dir),
        worker_args=("--memory-capacity-bytes", "2GiB", *engine_args),
        scheduler_args=scheduler_args,
        gateway_args=gateway_args,
    )


def run_processes(
    lengths: list[int],
    progress,
    live_repeats: int,
    model_dir: Path,
    max_len: int,
    hosts: str = "local",
) -> list[dict]:
    """`hosts`: "local" (two worker processes on loopback, UCX through shared memory)
    or "netns" (two namespace hosts, UCX over TCP across their veth links)."""
    mesh = _mesh(hosts, model_dir, max_len)
    progress(f"starting 2 worker processes, hosts={hosts} (logs in {mesh.log_dir})")
    mesh.start()
    try:
        return asyncio.run(_measure(mesh, lengths, progress, live_repeats))
    finally:
        mesh.stop()
