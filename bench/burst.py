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
flags, a cost model of this model calibrated on this host at the start, each step's
cost scaled per policy by what that run's steps measured (CPU / model of the workers'
logged steps over the residents and the burst: the same step cost 1.02-1.26x the
calibration from one mesh to the next on a quiet host), the mesh's own costs from
probes of the first mesh, and the machine's cores shared by every step, stage, request
path and token stream, with the other processes' load measured during each policy's
run. `fidelity` = simulated / measured P99 TTFT per policy (target:
within 25%). `--resim FILE` re-predicts a recorded run (its JSON line) without a mesh.

This module is the command: its flags and the summary. The workload is in
bench/_burst_workload.py, one policy's run on a mesh in bench/_burst_run.py, the
simulator's side in bench/_burst_sim.py and the ratios, table and `--resim` in
bench/_burst_report.py.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench import _burst_sim, _cpu
from bench._burst_report import add_ratios, print_table, resimulate, sim_figures
from bench._burst_run import GROUP_KNOBS, MAX_NUM_SEQS, NUM_WORKERS, rounded, run_policy
from bench._burst_steps import join_cpu_s, read_steps, step_windows, summarise
from bench._burst_workload import WORKLOAD_ARGS, reference_tokens, workload
from bench._checkpoint import llama_config, write_checkpoint
from bench.kunserve_mechanism import BLOCK_SIZE, MODEL_SHAPE

POLICIES = ("recompute", "llumnix", "kunserve", "llmesh")


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
    profile, fit_error = _burst_sim.calibrate(model_dir, memory_nbytes, num_processes=NUM_WORKERS)
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
    windows = step_windows(args)
    for run in runs.values():
        run.steps = summarise(
            read_steps(run.worker_logs, run.started_at), profile.coefficients(), windows
        )
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
    # The drop's own cost, as the workers measured it (every join of every run).
    joins = [s for r in runs.values() for s in join_cpu_s(r.worker_logs)]
    costs["group_join_s"] = round(statistics.fmean(joins), 6) if joins else 0.0
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
        "probe_speed": rounded(first.probe_speed, 3),
        "host": {
            "cores": os.cpu_count(),
            "load_avg_at_start": load_at_start,
            "load_avg_at_end": [round(x, 2) for x in os.getloadavg()],
        },
        "workload_args": {k: getattr(args, k) for k in WORKLOAD_ARGS},
        "sim_config": sim,
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    add_ratios(summary)
    print_table(summary)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
