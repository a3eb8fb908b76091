"""`llmesh bench soak`: the mesh at twice its capacity for minutes, admission control on,
next to the same mesh with admission control off (unbounded queues).

    mesh      scheduler + gateway + 2 workers (embedded tiny model) as processes on
              loopback; each worker's running batch is --max-num-seqs and its waiting
              queue --max-waiting (Submit answers RESOURCE_EXHAUSTED beyond it; the
              gateway tries the other worker, then sheds with RESOURCE_EXHAUSTED)
    capacity  completed requests/s of a closed loop of 2 x (max_num_seqs + max_waiting)
              x workers streams over --capacity-s seconds (every batch and queue full)
    soak      Poisson arrivals at --load x capacity (default 2x) for --duration-s,
              no client retries: every request completes (its tokens must equal its
              undisturbed run), is shed with RESOURCE_EXHAUSTED, or is lost
    baseline  a fresh mesh with unbounded queues (--max-waiting none), the same load
              for --baseline-s (shorter), then cut off: its queue, TTFT and RSS grow

RSS (VmRSS) of every mesh process is sampled each second; its least-squares slope after
--warmup-s is reported per process (MiB/min). After the soak drains, every worker must
be idle with all KV blocks free and its block manager's integrity check passing
(leaked_blocks counts the used blocks left). The last stdout line is JSON with
`duration_s`, `offered_rps`, `admitted_rps`, `shed_pct`, `rss_slope_mib_per_min` (the
largest), `p99_ttft_s`, `lost_requests`, `leaked_blocks`, and the baseline's figures.
`p99_ttft_s` is what the load generator saw (its own lag included: on a starved host
its event loop reads chunks late); `gateway_p99_ttft_le_s` is the gateway's, from its
TTFT histogram (a bucket bound), which admission control bounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

from bench._soak_gateway import quantile_upper_bound, scrape_ttft_buckets
from bench._soak_load import measure_capacity, open_loop, reference_tokens, templates
from bench._soak_rss import RssSampler
from protos import worker_pb2, worker_pb2_grpc
from services.common.grpc_client import cluster_channel
from services.common.procs import LocalMesh


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="llmesh bench soak", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="(the JSON line is always last)")
    parser.add_argument("--duration-s", type=float, default=300.0, help="the soak's length")
    parser.add_argument("--load", type=float, default=2.0, help="offered load / capacity")
    parser.add_argument("--capacity-s", type=float, default=20.0, help="capacity probe length")
    parser.add_argument("--warmup-s", type=float, default=60.0, help="RSS slope starts here")
    parser.add_argument(
        "--baseline-s", type=float, default=60.0, help="unbounded baseline (0 = skip)"
    )
    parser.add_argument("--max-num-seqs", type=int, default=8, help="running batch per worker")
    parser.add_argument("--max-waiting", type=int, default=8, help="waiting queue per worker")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=1, help="arrival process seed")
    parser.add_argument("--log-level", default="WARNING", help="of every mesh process")
    return parser.parse_args(argv)


def start_mesh(args, log_dir: Path, max_waiting: str) -> LocalMesh:
    quiet = ("--log-level", args.log_level)
    return LocalMesh(
        log_dir=log_dir,
        num_workers=2,
        worker_args=(
            "--max-num-seqs", str(args.max_num_seqs),
            "--max-waiting-requests", max_waiting,
            "--torch-threads", "1",
            *quiet,
        ),
        gateway_args=(
            # The gateway's per-instance bound mirrors the workers' (cheap early shedding);
            # the unbounded baseline lifts every gateway bound too.
            "--max-waiting-per-instance", "1000000" if max_waiting == "none" else max_waiting,
            *(("--max-inflight-requests", "1000000") if max_waiting == "none" else ()),
            *quiet,
        ),
        scheduler_args=quiet,
    )  # fmt: skip


def mesh_pids(mesh: LocalMesh) -> dict[str, int]:
    return {p.name: p.pid for p in mesh.processes()}


def drained_blocks(mesh: LocalMesh, timeout_s: float = 60.0) -> tuple[int, list[str]]:
    """Used KV blocks left on the workers once idle (or at the timeout), and any
    integrity errors of their block managers."""
    deadline = time.monotonic() + timeout_s
    used, errors = 0, []
    for worker in mesh.live_workers():
        with cluster_channel(worker.address) as channel:
            stub = worker_pb2_grpc.WorkerStub(channel)
            while True:
                load = stub.GetLoad(worker_pb2.GetLoadRequest(check_integrity=True), timeout=5)
                idle = (load.num_running, load.num_waiting, load.num_used_blocks) == (0, 0, 0)
                if idle or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
        used += load.num_used_blocks
        if load.integrity_error:
            errors.append(f"{worker.name}: {load.integrity_error}")
    return used, errors


def run_phase(args, mesh: LocalMesh, requests, expected, rate_rps, duration_s, drain, warmup_s):
    ttft_before = scrape_ttft_buckets(mesh.gateway.metrics_address)
    sampler = RssSampler(mesh_pids(mesh)).start()
    workers = {w.name: w.address for w in mesh.live_workers()}
    try:
        tally, elapsed_s = asyncio.run(
            open_loop(
                mesh.gateway_address,
                workers,
                requests,
                expected,
                rate_rps,
                duration_s,
                seed=args.seed,
                drain=drain,
            )
        )
    finally:
        sampler.stop()
    gateway_p99_ttft_s = quantile_upper_bound(
        ttft_before, scrape_ttft_buckets(mesh.gateway.metrics_address), 0.99
    )
    leaked, integrity_errors = drained_blocks(mesh)
    rss = sampler.summary(warmup_s)
    return {
        "duration_s": round(elapsed_s, 1),
        "offered_rps": round(tally.num_offered / duration_s, 2),
        "admitted_rps": round(tally.num_completed / elapsed_s, 2),
        "shed_pct": round(100 * tally.num_shed / max(tally.num_offered, 1), 1),
        "rss_slope_mib_per_min": max(v["rss_slope_mib_per_min"] for v in rss.values()),
        "p99_ttft_s": round(tally.p99_ttft_s(), 3),
        # At the gateway (its histogram; the bucket bound): without the client's own lag.
        "gateway_p99_ttft_le_s": gateway_p99_ttft_s,
        "lost_requests": tally.num_lost,
        "leaked_blocks": leaked,
        "num_offered": tally.num_offered,
        "num_completed": tally.num_completed,
        "num_shed": tally.num_shed,
        "num_cancelled": tally.num_cancelled,
        "num_mismatched_tokens": tally.num_mismatched,
        "shed_codes": dict(tally.shed_codes),
        "lost_reasons": dict(tally.lost),
        "integrity_errors": integrity_errors,
        "max_waiting_seen": tally.max_waiting_seen,
        "rss_by_process": rss,
    }


def print_table(capacity_rps: float, phases: dict[str, dict]) -> None:
    print(f"capacity (closed loop): {capacity_rps:.2f} requests/s")
    header = (
        f"{'phase':<10}{'secs':>7}{'offered/s':>11}{'admitted/s':>12}{'shed %':>8}"
        f"{'p99 TTFT s':>12}{'at gateway':>12}{'lost':>6}{'leaked':>8}{'max wait':>10}{'RSS MiB/min':>13}"
    )
    print(header)
    print("-" * len(header))
    for name, r in phases.items():
        print(
            f"{name:<10}{r['duration_s']:>7.0f}{r['offered_rps']:>11.2f}{r['admitted_rps']:>12.2f}"
            f"{r['shed_pct']:>8.1f}{r['p99_ttft_s']:>12.3f}"
            f"{'<= ' + str(r['gateway_p99_ttft_le_s']):>12}{r['lost_requests']:>6}"
            f"{r['leaked_blocks']:>8}{max(r['max_waiting_seen'].values(), default=0):>10}"
            f"{r['rss_slope_mib_per_min']:>13.3f}"
        )
    for name, r in phases.items():
        print(f"{name} RSS per process (MiB at warm-up end -> end, slope MiB/min):")
        for process, v in r["rss_by_process"].items():
            print(
                f"  {process:<10}{v['rss_start_mib']:>9.1f} -> {v['rss_end_mib']:>8.1f}"
                f"{v['rss_slope_mib_per_min']:>10.3f}"
            )


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    requests = templates(args.prompt_len, args.max_tokens)
    log_dir = Path(tempfile.mkdtemp(prefix="llmesh-soak-"))
    print(f"logs: {log_dir}", flush=True)
    phases: dict[str, dict] = {}
    with start_mesh(args, log_dir / "soak", str(args.max_waiting)) as mesh:
        expected = asyncio.run(reference_tokens(mesh.gateway_address, requests))
        concurrency = 2 * (args.max_num_seqs + args.max_waiting) * len(mesh.workers)
        capacity_rps = asyncio.run(
            measure_capacity(mesh.gateway_address, requests, concurrency, args.capacity_s)
        )
        rate_rps = args.load * capacity_rps
        print(f"capacity {capacity_rps:.2f} req/s; offering {rate_rps:.2f} req/s", flush=True)
        phases["soak"] = run_phase(
            args, mesh, requests, expected, rate_rps, args.duration_s, True, args.warmup_s
        )
    if args.baseline_s > 0:
        with start_mesh(args, log_dir / "baseline", "none") as mesh:
            asyncio.run(reference_tokens(mesh.gateway_address, requests))  # warm up alike
            phases["unbounded"] = run_phase(
                args,
                mesh,
                requests,
                expected,
                rate_rps,
                args.baseline_s,
                False,
                min(args.warmup_s, args.baseline_s / 4),
            )
    print_table(capacity_rps, phases)
    result = dict(phases["soak"])
    result.update(
        capacity_rps=round(capacity_rps, 2),
        load=args.load,
        max_num_seqs=args.max_num_seqs,
        max_waiting=args.max_waiting,
        baseline=phases.get("unbounded"),
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
