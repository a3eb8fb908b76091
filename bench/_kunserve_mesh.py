"""The mesh half of `llmesh bench kunserve_mechanism`: real worker processes drop,
serve as one pipeline, and restore, driven through the scheduler's DropGroup /
RestoreGroup like `llmesh drop` / `llmesh restore`.

For each g (2, then 4), on the first g of the mesh's workers (the others drained, so
every request lands on the members, or on the group once it exists), a few rounds of:

    1. capacity before   each member's load report (GetLoad): its pool, in blocks
    2. unpipelined       the batch through the gateway, spread over the g members alone
    3. drop              2 requests per member decoding (their KV is exchanged); the
                         decode step from their token stream just before; DropGroup:
                         drop_ms (stage 0's, order -> capacity usable), the group pool
    4. pipelined         the same batch through the gateway, served by the group
    5. restore           2 requests per member running in the group; RestoreGroup:
                         restore_ms; they finish on their home members
    6. clean             every member alone again, idle, block manager integrity OK

Every request's tokens are checked against one in-process engine on the same weights
(greedy and seeded sampling alike). CPU seconds of the members and of the machine are
taken around both batch runs: they tell what bounds the pipeline on a small host.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass

from bench._cpu import available_cores, machine_busy_s, processes_cpu_s
from bench._kunserve_figures import Capacity, median_gap_ms, stall_ms, tokens_per_s
from bench._kunserve_workload import Request
from gateway.client import AsyncClient, Chunk
from protos import common_pb2, scheduler_pb2, scheduler_pb2_grpc, worker_pb2, worker_pb2_grpc
from services.common.grpc_client import aio_channel
from services.common.procs import LocalMesh

RPC_TIMEOUT_S = 10.0
GROUP_RPC_TIMEOUT_S = 180.0
STREAM_TIMEOUT_S = 600.0
TOKENS_BEFORE_DROP = 8  # each running request has this many tokens when the drop starts
TOKENS_BEFORE_RESTORE = 4


class Streams:
    """One named request set streamed through the gateway (request ids "<tag>-<i>");
    per request, its chunks and their arrival times (time.perf_counter)."""

    def __init__(self, client: AsyncClient, tag: str, requests: list[Request]) -> None:
        self.ids = [f"{tag}-{i}" for i in range(len(requests))]
        self.chunks: dict[str, list[tuple[float, Chunk]]] = {r: [] for r in self.ids}
        self._tasks = [
            asyncio.create_task(self._pump(client, r, request))
            for r, request in zip(self.ids, requests, strict=True)
        ]

    async def _pump(self, client: AsyncClient, request_id: str, request: Request) -> None:
        prompt, sampling = request
        async for chunk in client.generate_stream(
            prompt_token_ids=prompt, request_id=request_id, **sampling
        ):
            self.chunks[request_id].append((time.perf_counter(), chunk))

    def num_tokens(self, request_id: str) -> int:
        return sum(len(c.token_ids) for _, c in self.chunks[request_id])

    async def wait_tokens(self, count: int, timeout_s: float = STREAM_TIMEOUT_S) -> None:
        """Until every stream has `count` tokens (a failed stream raises)."""
        deadline = time.monotonic() + timeout_s
        while any(self.num_tokens(r) < count for r in self.ids):
            for task in self._tasks:
                if task.done():
                    task.result()  # raises if the stream failed
            if time.monotonic() > deadline:
                raise TimeoutError(f"streams did not reach {count} tokens in {timeout_s}s")
            await asyncio.sleep(0.002)

    async def finish(self, timeout_s: float = STREAM_TIMEOUT_S) -> None:
        """Until every stream ended; on a failure the others are cancelled."""
        try:
            await asyncio.wait_for(asyncio.gather(*self._tasks), timeout_s)
        finally:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def tokens(self) -> list[list[int]]:
        """Every request's tokens, in order; raises if a token was skipped or repeated."""
        result = []
        for request_id in self.ids:
            tokens: list[int] = []
            for _, chunk in self.chunks[request_id]:
                if chunk.first_token_index != len(tokens):
                    raise RuntimeError(
                        f"{request_id}: chunk at token {chunk.first_token_index} after "
                        f"{len(tokens)}"
                    )
                tokens.extend(chunk.token_ids)
            result.append(tokens)
        return result

    def arrival_times(self) -> list[list[float]]:
        """Per request, when each chunk with tokens arrived."""
        return [[t for t, c in self.chunks[r] if c.token_ids] for r in self.ids]


@dataclass(frozen=True)
class BatchRun:
    tokens: list[list[int]]
    wall_s: float
    cpu: dict  # wall_s, members_cpu_s, machine_busy_share (where /proc has them)


@dataclass
class Round:
    """One round of one g: unpipelined batch, drop, pipelined batch, restore."""

    num_stages: int
    capacity: Capacity
    drop_ms: float
    drop_rpc_ms: float
    restore_ms: float
    restore_rpc_ms: float
    decode_step_ms: float
    unpipelined_tokens_per_s: float
    pipelined_tokens_per_s: float
    tokens_identical: bool  # batch: pipelined == unpipelined == reference
    running_exact: bool  # the requests crossing the drop and the restore: == reference
    freed_weight_bytes: int
    num_group_blocks_reported: int  # stage 0's load report after the drop
    layer_ranges: list[tuple[int, int]]
    num_running_at_drop: int  # the members' running requests (load reports): KV exchanged
    drop_stall_ms: float  # the longest token gap of a running request across the drop
    restore_stall_ms: float
    num_moved: int
    num_preempted: int
    cpu: dict  # "unpipelined" / "pipelined" -> BatchRun.cpu

    def figures(self) -> dict:
        """What bench/_kunserve_figures.group_figures aggregates over rounds."""
        return {
            "drop_ms": self.drop_ms,
            "restore_ms": self.restore_ms,
            "decode_step_ms": self.decode_step_ms,
            "unpipelined_tokens_per_s": self.unpipelined_tokens_per_s,
            "pipelined_tokens_per_s": self.pipelined_tokens_per_s,
            "tokens_identical": self.tokens_identical and self.running_exact,
        }

    def describe(self) -> str:
        return (
            f"drop {self.drop_ms:.0f} ms, restore {self.restore_ms:.0f} ms, step "
            f"{self.decode_step_ms:.1f} ms, tokens/s {self.unpipelined_tokens_per_s:.0f} "
            f"unpipelined vs {self.pipelined_tokens_per_s:.0f} pipelined, exact "
            f"{self.tokens_identical and self.running_exact}"
        )


class MeshBench:
    """Runs the phases above on a started LocalMesh (from one event loop)."""

    def __init__(
        self,
        mesh: LocalMesh,
        workloads: dict[str, list[Request]],
        expected: dict[str, list[list[int]]],
        block_size: int,
        progress,
    ) -> None:
        self.mesh = mesh
        self.workloads = workloads  # named request sets (bench/_kunserve_workload.py)
        self.expected = expected  # their tokens, from one local engine
        self.block_size = block_size
        self.progress = progress
        self._scheduler: scheduler_pb2_grpc.SchedulerStub  # on run()'s event loop
        self.addresses: dict[str, str] = {}  # instance id -> worker gRPC address
        self.pids = {w.name: w.pid for w in mesh.workers}

    async def run(self, stages: list[int], num_rounds: int) -> dict[int, list[Round]]:
        """num_rounds rounds of each g in stages."""
        async with aio_channel(self.mesh.scheduler_address) as channel:
            self._scheduler = scheduler_pb2_grpc.SchedulerStub(channel)
            return await self._run(stages, num_rounds)

    async def _run(self, stages: list[int], num_rounds: int) -> dict[int, list[Round]]:
        state = await self._scheduler.GetClusterState(
            scheduler_pb2.GetClusterStateRequest(), timeout=RPC_TIMEOUT_S
        )
        self.addresses = {i.info.instance_id: i.info.address for i in state.instances}
        ids = sorted(self.addresses)
        runs = {}
        async with AsyncClient(self.mesh.gateway_address, timeout_s=STREAM_TIMEOUT_S) as client:
            for g in stages:
                members, others = ids[:g], ids[g:]
                await self._set_draining(others, True)
                try:
                    runs[g] = []
                    for k in range(num_rounds):
                        runs[g].append(await self._run_round(client, g, members, k))
                        self.progress(f"g={g} round {k}: {runs[g][-1].describe()}")
                finally:
                    await self._set_draining(others, False)
        return runs

    async def _run_round(self, client: AsyncClient, g: int, members: list[str], k: int) -> Round:
        alone = [await self._load(m) for m in members]
        for m, load in zip(members, alone, strict=True):
            if load.group_id or load.num_running or load.num_used_blocks:
                raise RuntimeError(f"{m} is not alone and idle before g={g}: {load}")
        num_blocks_alone = sum(load.num_total_blocks for load in alone)

        unpipelined = await self._serve_batch(client, f"u{g}.{k}", members)

        name = f"running{g}"
        running = Streams(client, f"{name}.{k}", self.workloads[name])
        await running.wait_tokens(TOKENS_BEFORE_DROP)
        decode_step_ms = statistics.median(map(median_gap_ms, running.arrival_times()))
        num_running = sum([(await self._load(m)).num_running for m in members])
        started = time.perf_counter()
        dropped = await self._scheduler.DropGroup(
            scheduler_pb2.DropGroupRequest(instance_ids=members), timeout=GROUP_RPC_TIMEOUT_S
        )
        drop_rpc_ms = (time.perf_counter() - started) * 1000
        group = dropped.group
        leader = await self._load(members[0])
        await running.finish()
        drop_stall = max(stall_ms(times, started) for times in running.arrival_times())
        exact = running.tokens() == self.expected[name]

        pipelined = await self._serve_batch(client, f"p{g}.{k}", members)

        name = f"restoring{g}"
        restoring = Streams(client, f"{name}.{k}", self.workloads[name])
        await restoring.wait_tokens(TOKENS_BEFORE_RESTORE)
        started = time.perf_counter()
        restored = await self._scheduler.RestoreGroup(
            scheduler_pb2.RestoreGroupRequest(group_id=group.group_id),
            timeout=GROUP_RPC_TIMEOUT_S,
        )
        restore_rpc_ms = (time.perf_counter() - started) * 1000
        await restoring.finish()
        restore_stall = max(stall_ms(times, started) for times in restoring.arrival_times())
        exact = exact and restoring.tokens() == self.expected[name]
        await self._check_clean(members)

        num_tokens = sum(sampling["max_tokens"] for _, sampling in self.workloads["batch"])
        return Round(
            num_stages=g,
            capacity=Capacity(g, self.block_size, num_blocks_alone, group.num_group_blocks),
            drop_ms=dropped.drop_ms,
            drop_rpc_ms=drop_rpc_ms,
            restore_ms=restored.restore_ms,
            restore_rpc_ms=restore_rpc_ms,
            decode_step_ms=decode_step_ms,
            unpipelined_tokens_per_s=tokens_per_s(num_tokens, unpipelined.wall_s),
            pipelined_tokens_per_s=tokens_per_s(num_tokens, pipelined.wall_s),
            tokens_identical=unpipelined.tokens == pipelined.tokens == self.expected["batch"],
            running_exact=exact,
            freed_weight_bytes=group.freed_weight_bytes,
            num_group_blocks_reported=leader.num_total_blocks,
            layer_ranges=[(m.layer_start, m.layer_end) for m in group.members],
            num_running_at_drop=num_running,
            drop_stall_ms=drop_stall,
            restore_stall_ms=restore_stall,
            num_moved=restored.num_requests_moved,
            num_preempted=restored.num_preempted,
            cpu={"unpipelined": unpipelined.cpu, "pipelined": pipelined.cpu},
        )

    async def _serve_batch(self, client: AsyncClient, tag: str, members: list[str]) -> BatchRun:
        """The batch, every request submitted at once; wall time from the first submit
        to the last token; CPU seconds of the members and the machine meanwhile."""
        pids = [self.pids[m] for m in members]
        cpu_before, busy_before = processes_cpu_s(pids), machine_busy_s()
        started = time.perf_counter()
        streams = Streams(client, tag, self.workloads["batch"])
        await streams.finish()
        wall_s = max(times[-1] for times in streams.arrival_times()) - started
        cpu_after, busy_after = processes_cpu_s(pids), machine_busy_s()
        cpu = {"wall_s": round(wall_s, 3)}
        if cpu_before is not None and cpu_after is not None:
            cpu["members_cpu_s"] = round(cpu_after - cpu_before, 3)
        if busy_before is not None and busy_after is not None:
            cpu["machine_busy_share"] = round(
                (busy_after - busy_before) / (wall_s * available_cores()), 3
            )
        return BatchRun(streams.tokens(), wall_s, cpu)

    async def _load(self, instance_id: str, check_integrity: bool = False):
        async with aio_channel(self.addresses[instance_id]) as channel:
            return await worker_pb2_grpc.WorkerStub(channel).GetLoad(
                worker_pb2.GetLoadRequest(check_integrity=check_integrity), timeout=RPC_TIMEOUT_S
            )

    async def _check_clean(self, members: list[str], timeout_s: float = 30.0) -> None:
        """Every member alone with every layer, idle, its block manager intact."""
        deadline = time.monotonic() + timeout_s
        for m in members:
            while True:
                load: common_pb2.LoadReport = await self._load(m, check_integrity=True)
                is_clean = (
                    not load.group_id
                    and (load.num_running, load.num_waiting, load.num_used_blocks) == (0, 0, 0)
                    and load.integrity_error == ""
                )
                if is_clean:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{m} is not alone, idle and intact after the restore: {load}"
                    )
                await asyncio.sleep(0.05)

    async def _set_draining(self, instance_ids: list[str], draining: bool) -> None:
        for instance_id in instance_ids:
            await self._scheduler.Drain(
                scheduler_pb2.SchedulerDrainRequest(
                    instance_id=instance_id, is_terminating=draining
                ),
                timeout=RPC_TIMEOUT_S,
            )
        deadline = time.monotonic() + 30
        while True:  # until the reports (what dispatch reads) show it
            state = await self._scheduler.GetClusterState(
                scheduler_pb2.GetClusterStateRequest(), timeout=RPC_TIMEOUT_S
            )
            flags = {i.info.instance_id: i.load.is_terminating for i in state.instances}
            if all(flags.get(i) == draining for i in instance_ids):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{instance_ids} did not report is_terminating={draining}")
            await asyncio.sleep(0.05)
