"""One policy's run of `llmesh bench burst` on a fresh real mesh: start it, optionally
probe it for the simulator's mesh costs, play the arrivals with a streaming client, and
count what happened (TTFTs, tokens, drops, restores, migrations, preemptions, CPU).

Apart from bench/burst.py (the CLI and the summary) because this is the only part that
needs processes and sockets: the workload, the simulator side and the report are pure.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from bench import _cpu
from bench._burst_sim import percentile, slowest
from bench._burst_workload import Arrival
from services.common.grpc_client import aio_channel

NUM_WORKERS = 4
MAX_NUM_SEQS = 64  # memory, not the batch size cap, is what a burst runs into
RPC_TIMEOUT_S = 10.0
NUM_PROBES = 8  # of each kind, on the first mesh (the simulator's mesh costs)
STREAM_TIMEOUT_S = 900.0
# The group policy's knobs for a run of a minute: votes over 0.5 s, a group serves at
# least 2 s and restores after 1 s of low, falling usage with nothing waiting.
GROUP_KNOBS = (
    "--group-interval-s", "0.1",
    "--group-vote-window-s", "0.5",
    "--group-hold-s", "2",
    "--group-restore-window-s", "1",
    "--group-weight-share", "0.55",
)  # fmt: skip


@dataclass
class PolicyRun:
    policy: str
    ttft_s: list[float] = field(default_factory=list)
    ttft_by_request: dict[int, float] = field(default_factory=dict)  # arrival index -> s
    started_at: float = 0.0  # wall clock when the first arrival was due
    drop_times_s: list[float] = field(default_factory=list)  # groups serving, after start
    decided_times_s: list[float] = field(default_factory=list)  # drops decided, after start
    worker_logs: list[Path] = field(default_factory=list)  # engine_step lines: _burst_steps
    steps: dict = field(default_factory=dict)  # _burst_steps.summarise, set by the caller
    tokens: list[list[int]] = field(default_factory=list)
    drops: int = 0
    restores: int = 0
    migrations: int = 0
    preemptions: int = 0
    elapsed_s: float = 0.0
    num_blocks: list[int] = field(default_factory=list)  # each worker's pool, alone
    probes: object = None  # bench.simulator_fidelity.Probes of the idle mesh, if probed
    cpu_cores: dict = field(default_factory=dict)  # during the workload: _cpu_cores
    # During the workload (bench/_cpu.BackgroundLoad): runnable threads of other
    # processes and of the mesh, on average; the background that processor sharing
    # needs to give the mesh the CPU it got (what the simulator is given).
    background_jobs: float | None = None
    own_threads: float | None = None
    effective_background_jobs: float | None = None
    probe_speed: float | None = None  # during the probes: a core's share per thread

    def figures(self) -> dict:
        return {
            "p50_ttft_s": round(percentile(self.ttft_s, 50), 4),
            "p99_ttft_s": round(percentile(self.ttft_s, 99), 4),
            "mean_ttft_s": round(statistics.fmean(self.ttft_s), 4),
            "drops": self.drops,
            "restores": self.restores,
            "migrations": self.migrations,
            "preemptions": self.preemptions,
            "elapsed_s": round(self.elapsed_s, 1),
            "drop_times_s": self.drop_times_s,
            "decided_times_s": self.decided_times_s,
            "started_at": round(self.started_at, 3),
            "steps": self.steps,
            "slowest_ttft": slowest(self.ttft_by_request),
            # Every request's TTFT by arrival index (where the two sides part).
            "ttfts_s": [round(self.ttft_by_request[k], 3) for k in sorted(self.ttft_by_request)],
            "cpu_cores": self.cpu_cores,
            "background_jobs": rounded(self.background_jobs),
            "own_threads": rounded(self.own_threads),
            "effective_background_jobs": rounded(self.effective_background_jobs),
        }


async def _play(gateway_address: str, arrivals: list[Arrival], tag: str) -> PolicyRun:
    from gateway.client import AsyncClient

    run = PolicyRun(tag)
    ttft: list[float | None] = [None] * len(arrivals)
    tokens: list[list[int]] = [[] for _ in arrivals]

    async with AsyncClient(gateway_address, timeout_s=STREAM_TIMEOUT_S) as client:
        start = time.perf_counter()
        run.started_at = time.time()  # the scheduler log's clock, for the drop times

        async def one(k: int, arrival: Arrival) -> None:
            await asyncio.sleep(max(0.0, start + arrival.at_s - time.perf_counter()))
            prompt, sampling = arrival.request
            submitted = time.perf_counter()
            async for chunk in client.generate_stream(
                prompt_token_ids=prompt, request_id=f"{tag}-{k}", **sampling
            ):
                if chunk.first_token_index != len(tokens[k]):
                    raise RuntimeError(
                        f"{tag}-{k}: chunk at token {chunk.first_token_index} after "
                        f"{len(tokens[k])}"
                    )
                if chunk.token_ids and ttft[k] is None:
                    ttft[k] = time.perf_counter() - submitted
                tokens[k].extend(chunk.token_ids)

        await asyncio.gather(*(one(k, a) for k, a in enumerate(arrivals)))
        run.elapsed_s = time.perf_counter() - start
    run.ttft_s = [t for t in ttft if t is not None]
    run.ttft_by_request = {k: t for k, t in enumerate(ttft) if t is not None}
    run.tokens = tokens
    return run


def _events(log_path: Path) -> list[dict]:
    events = []
    if not log_path.exists():
        return events
    for line in log_path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events


async def _worker_loads(mesh) -> list:

    from protos import worker_pb2, worker_pb2_grpc

    loads = []
    for worker in mesh.workers:
        async with aio_channel(worker.address) as channel:
            loads.append(
                await worker_pb2_grpc.WorkerStub(channel).GetLoad(
                    worker_pb2.GetLoadRequest(check_integrity=True), timeout=RPC_TIMEOUT_S
                )
            )
    return loads


async def _wait_clean(mesh, timeout_s: float = 120.0) -> list:
    """Every worker alone, idle, integrity-checked; their final load reports."""
    deadline = time.monotonic() + timeout_s
    while True:
        loads = await _worker_loads(mesh)
        if all(
            not ld.group_id
            and (ld.num_running, ld.num_waiting, ld.num_used_blocks) == (0, 0, 0)
            and ld.integrity_error == ""
            for ld in loads
        ):
            return loads
        if time.monotonic() > deadline:
            raise RuntimeError(f"workers not alone, idle and intact after the run: {loads}")
        await asyncio.sleep(0.2)


def rounded(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def _own_cores(cpu_cores: dict) -> float | None:
    if cpu_cores.get("workers") is None or cpu_cores.get("front_end") is None:
        return None
    return cpu_cores["workers"] + cpu_cores["front_end"]


def _speed(cpu_cores: dict, own_threads: float | None) -> float | None:
    """The share of a core each of the mesh's runnable threads had."""
    own = _own_cores(cpu_cores)
    if own is None or not own_threads:
        return None
    return min(1.0, own / own_threads)


def _cpu_sample(pids: tuple[list[int], list[int]]) -> tuple[float | None, ...]:
    workers, front_end = pids
    return (
        _cpu.processes_cpu_s(workers),
        _cpu.processes_cpu_s(front_end),
        _cpu.machine_busy_s(),
    )


def _cpu_cores(before, after, elapsed_s: float) -> dict[str, float | None]:
    """Mean cores the workers, the front end (gateway, scheduler, this client) and every
    other process on the machine used during the workload."""
    workers, front_end, busy = (
        None if a is None or b is None else round((b - a) / elapsed_s, 3)
        for a, b in zip(before, after, strict=True)
    )
    other = None
    if workers is not None and front_end is not None and busy is not None:
        other = round(max(0.0, busy - workers - front_end), 3)
    return {"workers": workers, "front_end": front_end, "other": other}


def run_policy(
    policy: str, args, model_dir: Path, memory_nbytes: int, arrivals, progress, probe: bool = False
):
    """One policy's run on a fresh mesh; with `probe`, the idle mesh is probed first for
    the simulator's mesh costs (run.probes)."""
    from bench.simulator_fidelity import _probe
    from services.common.procs import LocalMesh

    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="llmesh-bench-burst-")) / policy
    mesh = LocalMesh(
        log_dir=log_dir,
        num_workers=NUM_WORKERS,
        model=str(model_dir),
        worker_args=(
            "--torch-threads", "1", "--memory-capacity-bytes", str(memory_nbytes),
            "--max-num-seqs", str(MAX_NUM_SEQS),
        ),
        scheduler_args=("--policy", policy, *GROUP_KNOBS),
        gateway_args=("--log-level", "WARNING"),
        env={"LLMESH_WORKER_STEP_LOG": "true"},  # engine_step lines: bench/_burst_steps.py
    )  # fmt: skip
    progress(f"{policy}: starting a mesh of {NUM_WORKERS} workers (logs in {log_dir})")
    with mesh:
        workers = [w.pid for w in mesh.workers]
        front_end = [mesh.gateway.pid, mesh.scheduler.pid, os.getpid()]
        with _cpu.BackgroundLoad(workers + front_end) as background:
            probes = probe_speed = None
            if probe:
                prompt_len = round(statistics.fmean(len(a.request[0]) for a in arrivals))
                before, start = _cpu_sample((workers, front_end)), time.perf_counter()
                probes = asyncio.run(
                    _probe(mesh.gateway_address, NUM_PROBES, prompt_len, front_end)
                )
                end = time.perf_counter()
                used = _cpu_cores(before, _cpu_sample((workers, front_end)), end - start)
                probe_speed = _speed(used, background.mean_own(start, end))
                asyncio.run(_wait_clean(mesh))
            before, start = _cpu_sample((workers, front_end)), time.perf_counter()
            run = asyncio.run(_play(mesh.gateway_address, arrivals, policy))
            run.cpu_cores = _cpu_cores(before, _cpu_sample((workers, front_end)), run.elapsed_s)
            end = time.perf_counter()
            run.background_jobs = background.mean(start, end)
            run.own_threads = background.mean_own(start, end)
            own_cores = _own_cores(run.cpu_cores)
            run.effective_background_jobs = _cpu.effective_background(
                _cpu.available_cores(), run.own_threads, own_cores
            )
            run.probe_speed = probe_speed
        loads = asyncio.run(_wait_clean(mesh))
    run.probes = probes
    run.num_blocks = [ld.num_total_blocks for ld in loads]
    run.preemptions = sum(ld.num_preemptions for ld in loads)
    scheduler = _events(log_dir / "scheduler.log")
    run.drops = sum(e.get("event") == "group_serving" for e in scheduler)
    run.drop_times_s = [
        round(_log_time(e) - run.started_at, 2)
        for e in scheduler
        if e.get("event") == "group_serving"
    ]
    run.decided_times_s = [
        round(_log_time(e) - run.started_at, 2)
        for e in scheduler
        if e.get("event") == "group_drop_decided"
    ]
    run.worker_logs = [Path(w.log_path) for w in mesh.workers]
    run.restores = sum(e.get("event") == "group_restored" for e in scheduler)
    run.migrations = sum(
        e.get("event") == "migration_adopted"
        for w in mesh.workers
        for e in _events(Path(w.log_path))
    )
    progress(f"{policy}: {run.figures()}")
    return run


def _log_time(event: dict) -> float:
    """A structlog event's ISO timestamp (UTC) as seconds since the epoch."""
    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()
