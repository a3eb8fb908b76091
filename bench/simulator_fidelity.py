"""`llmesh bench simulator_fidelity`: one small workload on a real mesh and in the simulator.

The workload is the comparison report's fidelity workload (services/simulator/compare.py:
Poisson arrivals, 16–128-token prompts, 16–64 new tokens, greedy, no EOS stop) played
open-loop against a local mesh of 4 tiny-model workers (each request is sent at its
arrival time), then simulated with 4 instances of a cost-model profile (default the
built-in `tiny-cpu`; pass the JSON `llmesh calibrate --model tiny` wrote on this
machine for a meaningful figure). The live mesh has no migration loop yet, so the
simulator runs freest dispatch without migration too.

    real TTFT   first streamed chunk - send time
    real TPOT   (last chunk - first chunk) / (tokens - 1)

Mean TTFT and mean TPOT should agree within 25%. Workers share this machine's cores:
keep the rate low enough that they rarely run at the same time, or give each worker
its own cores (the simulator assumes one accelerator per instance). The last stdout
line is JSON; `--out FILE` also writes it for `llmesh simulate --compare --fidelity-real`.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="llmesh bench simulator_fidelity", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--json", action="store_true", help="(the JSON line is always last)")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--rate", type=float, default=8.0, help="mean request rate (req/s)")
    parser.add_argument("--profile", default="tiny-cpu", help="cost-model profile or JSON path")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("--log-dir", default=None, help="where the mesh processes log")
    args = parser.parse_args(argv)
    for name in ("workers", "requests", "threads"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be > 0")
    if args.rate <= 0:
        parser.error("--rate must be > 0")
    return args


def _requests(args):
    from services.simulator.compare import CompareConfig, fidelity_jobs
    from services.simulator.workload import generate

    cfg = CompareConfig(
        fidelity_instances=args.workers,
        fidelity_requests=args.requests,
        fidelity_rate=args.rate,
        fidelity_profile=args.profile,
        seed=args.seed,
    )
    (job,) = fidelity_jobs(cfg)
    return job, generate(job.workload)


def _prompt(index: int, length: int) -> list[int]:
    return [(31 * index + 7 * j) % 256 for j in range(length)]


async def _play(address: str, requests) -> list[tuple[float, float, int]]:
    """(ttft_s, tpot_s or nan, num_tokens) per request, open loop."""
    from gateway.client import AsyncClient

    results: list[tuple[float, float, int]] = [(0.0, 0.0, 0)] * len(requests)
    async with AsyncClient(address, timeout_s=600) as client:
        await client.generate(prompt_token_ids=[1, 2, 3], max_tokens=2, ignore_eos=True)
        start = time.perf_counter()

        async def one(i: int) -> None:
            r = requests[i]
            await asyncio.sleep(max(0.0, start + r.arrival_s - time.perf_counter()))
            sent = time.perf_counter()
            first = last = None
            num_tokens = 0
            async for chunk in client.generate_stream(
                prompt_token_ids=_prompt(i, r.num_prompt_tokens),
                max_tokens=r.num_output_tokens,
                ignore_eos=True,
            ):
                now = time.perf_counter()
                if chunk.token_ids and first is None:
                    first = now
                if chunk.token_ids:
                    last = now
                num_tokens += len(chunk.token_ids)
            assert first is not None and last is not None
            tpot = (last - first) / (num_tokens - 1) if num_tokens > 1 else float("nan")
            results[i] = (first - sent, tpot, num_tokens)

        await asyncio.gather(*(one(i) for i in range(len(requests))))
    return results


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)

    from services.common.procs import LocalMesh
    from services.simulator.cluster import Simulator

    job, requests = _requests(args)
    print(
        f"workload: {len(requests)} requests, Poisson {args.rate}/s, {args.workers} tiny workers "
        f"({args.threads} torch thread(s) each), profile {args.profile}",
        flush=True,
    )
    mesh = LocalMesh(
        log_dir=Path(args.log_dir or tempfile.mkdtemp(prefix="llmesh-bench-fidelity-")),
        num_workers=args.workers,
        worker_args=("--torch-threads", str(args.threads), "--log-level", "WARNING"),
        gateway_args=("--log-level", "WARNING"),
        scheduler_args=("--log-level", "WARNING"),
    ).start()
    try:
        real = asyncio.run(_play(mesh.gateway_address, requests))
    finally:
        mesh.stop()
    if any(n != r.num_output_tokens for (_, _, n), r in zip(real, requests, strict=True)):
        print("MISMATCH: a request did not produce all its tokens", flush=True)
        return 1
    tpots = [t for _, t, n in real if n > 1]
    real_ttft = sum(t for t, _, _ in real) / len(real)
    real_tpot = sum(tpots) / len(tpots)

    config = dataclasses.replace(job.config, migration="none")
    summary = Simulator(config, requests).run().summary
    out = {
        "real_mean_ttft_s": round(real_ttft, 6),
        "sim_mean_ttft_s": round(summary.mean_ttft_s, 6),
        "real_mean_tpot_s": round(real_tpot, 6),
        "sim_mean_tpot_s": round(summary.mean_tpot_s, 6),
        "ttft_error": round(summary.mean_ttft_s / real_ttft - 1, 4),
        "tpot_error": round(summary.mean_tpot_s / real_tpot - 1, 4),
        "requests": len(requests),
        "rate": args.rate,
        "workers": args.workers,
        "profile": args.profile,
    }
    out["within_25pct"] = abs(out["ttft_error"]) <= 0.25 and abs(out["tpot_error"]) <= 0.25
    print(f"mean TTFT  real {real_ttft * 1e3:8.2f} ms   sim {summary.mean_ttft_s * 1e3:8.2f} ms")
    print(f"mean TPOT  real {real_tpot * 1e3:8.2f} ms   sim {summary.mean_tpot_s * 1e3:8.2f} ms")
    line = json.dumps(out)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
