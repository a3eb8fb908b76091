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

from bench._checkpoint import llama_config, write_checkpoint
from bench.kunserve_mechanism import BLOCK_SIZE, MODEL_SHAPE

POLICIES = ("recompute", "llumnix", "kunserve", "llmesh")
NUM_WORKERS = 4
MAX_NUM_SEQS = 64  # memory, not the batch size cap, is what a burst runs into
RPC_TIMEOUT_S = 10.0
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


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


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

    def figures(self) -> dict:
        return {
            "p50_ttft_s": round(_percentile(self.ttft_s, 50), 4),
            "p99_ttft_s": round(_percentile(self.ttft_s, 99), 4),
            "mean_ttft_s": round(statistics.fmean(self.ttft_s), 4),
            "drops": self.drops,
            "restores": self.restores,
            "migrations": self.migrations,
            "preemptions": self.preemptions,
            "elapsed_s": round(self.elapsed_s, 1),
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


def run_policy(policy: str, args, model_dir: Path, memory_nbytes: int, arrivals, progress):
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
        run = asyncio.run(_play(mesh.gateway_address, arrivals, policy))
        loads = asyncio.run(_wait_clean(mesh))
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
        f"{kv_tokens} tokens of KV in all; reference tokens on a local engine"
    )
    expected = reference_tokens(model_dir, arrivals)
    runs = {
        p: run_policy(p, args, model_dir, memory_nbytes, arrivals, progress) for p in args.policies
    }
    identical = {p: r.tokens == expected for p, r in runs.items()}
    summary = {
        "policies": {p: r.figures() for p, r in runs.items()},
        "tokens_identical": all(identical.values()),
        "tokens_identical_per_policy": identical,
        "sim_p99_ttft_s": {},
        "num_requests": len(arrivals),
        "num_burst_requests": args.burst,
        "weight_share": args.weight_share,
        "memory_capacity_bytes": memory_nbytes,
        "block_size": BLOCK_SIZE,
        "host": {
            "cores": os.cpu_count(),
            "load_avg_at_start": load_at_start,
            "load_avg_at_end": [round(x, 2) for x in os.getloadavg()],
        },
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    if "recompute" in runs and "kunserve" in runs:
        summary["kunserve_p99_ttft_speedup_vs_recompute"] = round(
            runs["recompute"].figures()["p99_ttft_s"] / runs["kunserve"].figures()["p99_ttft_s"], 2
        )
    _print_table(summary)
    print(json.dumps(summary))
    return 0


def _print_table(summary: dict) -> None:
    print(f"{'policy':>10} {'p50 ttft s':>10} {'p99 ttft s':>10} {'drops':>6} {'migr':>5} "
          f"{'preempt':>7} {'tokens exact':>12}")  # fmt: skip
    for policy, f in summary["policies"].items():
        exact = summary["tokens_identical_per_policy"][policy]
        print(f"{policy:>10} {f['p50_ttft_s']:>10.3f} {f['p99_ttft_s']:>10.3f} {f['drops']:>6} "
              f"{f['migrations']:>5} {f['preemptions']:>7} {exact!s:>12}")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
