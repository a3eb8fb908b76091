"""`llmesh bench burst --json`: a KV-overloading burst on a real 4-worker mesh, once per
scheduling policy (recompute, llumnix, kunserve, llmesh), P99 TTFT side by side.

Each policy gets a fresh mesh (scheduler, gateway, 4 workers) on the memory-constrained
model of `bench kunserve_mechanism` (weights 55% of each worker's memory) and the same
requests at the same times:

    residents long requests over the first second: their prompts alone take most of
              the 4 workers' KV, and as they decode it grows past what they hold
    burst     many shorter requests within a second, once the pools are full: they
              queue for memory (the TTFT a KV-centric system pays), or run at once
              if the workers drop their replicated layers
    tail      a few more at a low rate while the burst drains

The live scheduler runs the policy preset (`--policy`): recompute (memory-aware
dispatch, preempt and recompute), llumnix (migration), kunserve (drop parameters and
pipeline, restore once the burst has passed), llmesh (both). Per request: TTFT (submit
-> first token at the client) and its tokens, checked against one local engine on the
same weights (greedy and seeded sampling: the same tokens however the mesh runs it).
Per policy: P50/P99 TTFT, drops and restores (scheduler log), migrations (committed,
workers' logs), preemptions (workers' counters). After each run every worker must be
alone, idle, with its block manager intact.

Next to them, the simulator's prediction of the same run (bench/_burst_sim.py): the
same arrivals and lengths on 4 simulated engines with the workers' pool (159 blocks,
checked against their load reports), the live scheduler's config parsed from the same
flags, a cost model of this model calibrated on this host at the start, the mesh's own
costs from probes of the first mesh, and the machine's cores shared by every step,
stage, request path and token stream, with the other processes' load measured during
each policy's run. `fidelity` = simulated / measured P99 TTFT per policy (target:
within 25%). `--resim FILE` re-predicts a recorded run (its JSON line) without a mesh.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import _burst_sim, _cpu
from bench._burst_sim import percentile
from bench._checkpoint import llama_config, write_checkpoint
from bench.kunserve_mechanism import BLOCK_SIZE, MODEL_SHAPE

POLICIES = ("recompute", "llumnix", "kunserve", "llmesh")
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

Request = tuple[list[int], dict]


@dataclass(frozen=True)
class Arrival:
    at_s: float  # after the run's start
    request: Request


def workload(args) -> list[Arrival]:
    """Deterministic arrivals: calm, burst, tail (module docstring)."""
    rng = random.Random(args.seed)

    def request(i: int, prompt_len: int, max_tokens: int) -> Request:
        prompt = [(31 * i + 7 * j + args.seed) % 256 for j in range(prompt_len)]
        sampling = {
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "seed": 5000 + i,
            "temperature": 0.0 if i % 2 else 0.8,
        }
        return prompt, sampling

    arrivals, i = [], 0
    for _ in range(args.residents):
        at = rng.uniform(0, 1.0)
        tokens = rng.randint(args.resident_tokens * 3 // 4, args.resident_tokens)
        prompt_len = rng.randint(args.resident_prompt * 5 // 6, args.resident_prompt)
        arrivals.append(Arrival(at, request(i, prompt_len, tokens)))
        i += 1
    for _ in range(args.burst):
        at = args.burst_at_s + rng.uniform(0, args.burst_s)
        prompt_len = rng.randint(args.burst_prompt // 2, args.burst_prompt)
        arrivals.append(Arrival(at, request(i, prompt_len, args.burst_tokens)))
        i += 1
    t = args.burst_at_s + args.burst_s
    for _ in range(args.tail):
        t += rng.expovariate(args.tail_rate)
        arrivals.append(Arrival(t, request(i, rng.randint(32, 96), rng.randint(32, 64))))
        i += 1
    return sorted(arrivals, key=lambda a: a.at_s)


def reference_tokens(model_dir: Path, arrivals: list[Arrival]) -> list[list[int]]:
    from bench._kunserve_workload import reference_tokens as run_reference

    return run_reference(model_dir, {"burst": [a.request for a in arrivals]})["burst"]


@dataclass
class PolicyRun:
    policy: str
    ttft_s: list[float] = field(default_factory=list)
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
            "cpu_cores": self.cpu_cores,
            "background_jobs": _round(self.background_jobs),
            "own_threads": _round(self.own_threads),
            "effective_background_jobs": _round(self.effective_background_jobs),
        }


async def _play(gateway_address: str, arrivals: list[Arrival], tag: str) -> PolicyRun:
    from gateway.client import AsyncClient

    run = PolicyRun(tag)
    ttft: list[float | None] = [None] * len(arrivals)
    tokens: list[list[int]] = [[] for _ in arrivals]

    async with AsyncClient(gateway_address, timeout_s=STREAM_TIMEOUT_S) as client:
        start = time.perf_counter()

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
    import grpc

    from protos import worker_pb2, worker_pb2_grpc

    loads = []
    for worker in mesh.workers:
        async with grpc.aio.insecure_channel(worker.address) as channel:
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


def _round(value: float | None, digits: int = 2) -> float | None:
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
    run.restores = sum(e.get("event") == "group_restored" for e in scheduler)
    run.migrations = sum(
        e.get("event") == "migration_adopted"
        for w in mesh.workers
        for e in _events(Path(w.log_path))
    )
    progress(f"{policy}: {run.figures()}")
    return run


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="llmesh bench burst", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="(the JSON line is always last)")
    parser.add_argument("--policies", default=",".join(POLICIES), help="comma-separated presets")
    parser.add_argument("--residents", type=int, default=20, help="long requests first")
    parser.add_argument("--resident-prompt", type=int, default=480, help="longest resident prompt")
    parser.add_argument(
        "--resident-tokens", type=int, default=300, help="most new tokens of a resident"
    )
    parser.add_argument("--burst", type=int, default=24, help="requests in the burst")
    parser.add_argument("--burst-at-s", type=float, default=3.0, help="when the burst starts")
    parser.add_argument("--burst-s", type=float, default=1.0, help="the burst's length, seconds")
    parser.add_argument("--burst-prompt", type=int, default=128, help="longest burst prompt")
    parser.add_argument("--burst-tokens", type=int, default=64, help="new tokens per burst request")
    parser.add_argument("--tail", type=int, default=4, help="requests after the burst")
    parser.add_argument("--tail-rate", type=float, default=2.0, help="requests/s after it")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--weight-share", type=float, default=0.55)
    parser.add_argument("--log-dir", default=None, help="where the meshes log (default: temp)")
    parser.add_argument(
        "--resim",
        default=None,
        metavar="FILE",
        help="no mesh: re-simulate the run whose JSON line FILE holds, print it again",
    )
    args = parser.parse_args(argv)
    args.policies = [p for p in args.policies.split(",") if p]
    unknown = sorted(set(args.policies) - set(POLICIES))
    if unknown:
        parser.error(f"--policies: unknown {unknown}; choose from {list(POLICIES)}")
    return args


def main(argv: list[str]) -> int:
    args = _parse(argv)

    def progress(line: str) -> None:
        print(line, file=sys.stderr if args.json else sys.stdout, flush=True)

    if args.resim:
        return resimulate(Path(args.resim), args.policies, progress)
    from services.common.logging import setup_logging

    setup_logging("bench-burst", level="WARNING")
    started = time.monotonic()
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    config = llama_config(**MODEL_SHAPE)
    model_dir = write_checkpoint(
        Path(tempfile.gettempdir()) / "llmesh-bench-kunserve-model", config
    )
    memory_nbytes = round(config.num_params() * 4 / args.weight_share)
    arrivals = workload(args)
    kv_tokens = sum(len(a.request[0]) + a.request[1]["max_tokens"] for a in arrivals)
    progress(
        f"{len(arrivals)} requests ({args.burst} in a {args.burst_s} s burst), "
        f"{kv_tokens} tokens of KV in all; calibrating the cost model on this host"
    )
    profile, fit_error = _burst_sim.calibrate(model_dir, memory_nbytes)
    progress(
        f"profile: fixed {profile.fixed_s * 1e3:.2f} ms, {profile.per_token_s * 1e6:.1f} us/token, "
        f"{profile.per_seq_s * 1e6:.1f} us/request, {profile.per_context_token_s * 1e9:.1f} "
        f"ns/context token ({fit_error:.1%} mean fit error); reference tokens on a local engine"
    )
    expected = reference_tokens(model_dir, arrivals)
    runs = {
        p: run_policy(p, args, model_dir, memory_nbytes, arrivals, progress, probe=k == 0)
        for k, p in enumerate(args.policies)
    }
    engine = _burst_sim.engine_knobs(profile, NUM_WORKERS, BLOCK_SIZE, MAX_NUM_SEQS)
    real_blocks = sorted({n for r in runs.values() for n in r.num_blocks})
    if real_blocks != [engine["num_kv_blocks"]]:
        raise RuntimeError(
            f"workers' pools {real_blocks} blocks, the simulated engine's "
            f"{engine['num_kv_blocks']}: the memory accounting differs"
        )
    first = next(iter(runs.values()))
    costs = _burst_sim.mesh_costs(
        profile, first.probes, _cpu.available_cores(), first.probe_speed or 1.0
    )
    sim = _burst_sim.sim_block(profile, fit_error, costs, engine, GROUP_KNOBS)
    identical = {p: r.tokens == expected for p, r in runs.items()}
    summary = {
        "policies": {p: r.figures() for p, r in runs.items()},
        "tokens_identical": all(identical.values()),
        "tokens_identical_per_policy": identical,
        **sim_figures(sim, arrivals, {p: r.figures() for p, r in runs.items()}, progress),
        "num_requests": len(arrivals),
        "num_burst_requests": args.burst,
        "weight_share": args.weight_share,
        "memory_capacity_bytes": memory_nbytes,
        "block_size": BLOCK_SIZE,
        "num_blocks_per_worker": engine["num_kv_blocks"],
        "probe_mean_ttft_s": round(statistics.fmean(first.probes.ttfts), 4),
        "probe_mean_tpot_s": round(statistics.fmean(first.probes.tpots), 4),
        "probe_speed": _round(first.probe_speed, 3),
        "host": {
            "cores": os.cpu_count(),
            "load_avg_at_start": load_at_start,
            "load_avg_at_end": [round(x, 2) for x in os.getloadavg()],
        },
        "workload_args": {k: getattr(args, k) for k in WORKLOAD_ARGS},
        "sim_config": sim,
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    _add_ratios(summary)
    _print_table(summary)
    print(json.dumps(summary))
    return 0


# The flags that shape the workload (a recorded run's are replayed by --resim).
WORKLOAD_ARGS = (
    "residents", "resident_prompt", "resident_tokens", "burst", "burst_at_s", "burst_s",
    "burst_prompt", "burst_tokens", "tail", "tail_rate", "seed",
)  # fmt: skip


def sim_figures(sim: dict, arrivals, measured: dict, progress) -> dict:
    """The simulator's figures for each measured policy (the summary's sim_* keys), each
    with the other processes that loaded the machine during that policy's run."""
    figures = {}
    for policy, real in measured.items():
        background = real.get("effective_background_jobs")
        if background is None:  # a run recorded before the mesh's own threads were
            background = real.get("background_jobs") or 0.0
        figures[policy] = _burst_sim.simulate(policy, sim, arrivals, background)
        progress(f"{policy} (simulated): {figures[policy]}")
    return {
        "sim_p99_ttft_s": {p: f["p99_ttft_s"] for p, f in figures.items()},
        "sim_p50_ttft_s": {p: f["p50_ttft_s"] for p, f in figures.items()},
        "sim_drops": {p: f["drops"] for p, f in figures.items()},
        "sim_background_jobs": {p: f["background_jobs"] for p, f in figures.items()},
        "sim_policies": figures,
    }


def _add_ratios(summary: dict) -> None:
    """fidelity (simulated / measured P99 TTFT per policy) and the kunserve target."""
    measured = summary["policies"]
    summary["fidelity"] = {
        p: round(sim / measured[p]["p99_ttft_s"], 3) for p, sim in summary["sim_p99_ttft_s"].items()
    }
    summary["fidelity_within_25pct"] = all(
        abs(ratio - 1) <= 0.25 for ratio in summary["fidelity"].values()
    )
    if "recompute" in measured and "kunserve" in measured:
        speedup = measured["recompute"]["p99_ttft_s"] / measured["kunserve"]["p99_ttft_s"]
        summary["kunserve_p99_ttft_speedup_vs_recompute"] = round(speedup, 2)
        summary["kunserve_target_met"] = speedup >= 2 and measured["kunserve"]["drops"] >= 1


def resimulate(path: Path, policies, progress) -> int:
    """Re-predicts a recorded run (its JSON line) with this simulator; prints the table."""
    summary = json.loads(path.read_text().strip().splitlines()[-1])
    args = argparse.Namespace(**summary["workload_args"])
    measured = {p: f for p, f in summary["policies"].items() if p in policies}
    summary.update(sim_figures(summary["sim_config"], workload(args), measured, progress))
    _add_ratios(summary)
    _print_table(summary)
    print(json.dumps(summary))
    return 0


def _print_table(summary: dict) -> None:
    print(f"{'policy':>10} {'p50 ttft s':>10} {'p99 ttft s':>10} {'sim p50':>8} {'sim p99':>8} "
          f"{'sim/real':>8} {'drops':>5} {'sim':>4} {'migr':>5} {'preempt':>7} "
          f"{'tokens exact':>12} {'bg threads':>10}")  # fmt: skip
    for policy, f in summary["policies"].items():
        exact = summary["tokens_identical_per_policy"][policy]
        sim_p50 = summary["sim_p50_ttft_s"].get(policy, float("nan"))
        sim_p99 = summary["sim_p99_ttft_s"].get(policy, float("nan"))
        ratio = summary["fidelity"].get(policy, float("nan"))
        sim_drops = summary["sim_drops"].get(policy, "-")
        print(f"{policy:>10} {f['p50_ttft_s']:>10.3f} {f['p99_ttft_s']:>10.3f} {sim_p50:>8.3f} "
              f"{sim_p99:>8.3f} {ratio:>8.2f} {f['drops']:>5} {sim_drops!s:>4} "
              f"{f['migrations']:>5} {f['preemptions']:>7} {exact!s:>12} "
              f"{summary['sim_background_jobs'].get(policy, 0):>10.2f}")  # fmt: skip
    host = summary["host"]
    print(f"host: {host['cores']} cores, load average {host['load_avg_at_start']} at the start, "
          f"{host['load_avg_at_end']} at the end")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
