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

Before the workload, probes sent one at a time to the idle mesh measure what the mesh
adds around the engine: per step (the worker's serving loop) and per request (gateway,
dispatch RPC, submit, stream); the simulator gets them as `step_overhead_s` and
`dispatch_latency_s` (`--no-model-overhead` to leave them out). Mean TTFT and mean TPOT
should agree within 25%. Workers share this machine's cores:
keep the rate low enough that they rarely run at the same time, or give each worker
its own cores (the simulator assumes one accelerator per instance). The last stdout
line is JSON; `--out FILE` also writes it for `llmesh simulate --compare --fidelity-real`.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import statistics
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
    parser.add_argument("--probes", type=int, default=20, help="one-token probes (fixed path)")
    parser.add_argument(
        "--no-model-overhead",
        dest="model_overhead",
        action="store_false",
        help="do not give the simulator the mesh's measured fixed path as dispatch latency",
    )
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


async def _timed(client, **kwargs) -> tuple[float, float]:
    """(TTFT, TPOT) of one streamed request."""
    sent = time.perf_counter()
    first = last = None
    num_tokens = 0
    async for chunk in client.generate_stream(**kwargs):
        if chunk.token_ids:
            last = time.perf_counter()
            first = first or last
            num_tokens += len(chunk.token_ids)
    assert first is not None and last is not None
    return first - sent, (last - first) / max(num_tokens - 1, 1)


async def _play(address: str, requests, num_probes: int) -> tuple[list, list[float], list[float]]:
    """(ttft_s, tpot_s or nan, num_tokens) per request, open loop; and, measured one at
    a time on the idle mesh before the workload, the TTFTs of one-token probes and the
    TPOTs of 33-token decode probes."""
    from gateway.client import AsyncClient

    results: list[tuple[float, float, int]] = [(0.0, 0.0, 0)] * len(requests)
    async with AsyncClient(address, timeout_s=600) as client:
        await client.generate(prompt_token_ids=[1, 2, 3], max_tokens=2, ignore_eos=True)
        ttft_probes = [
            (await _timed(client, prompt_token_ids=[7], max_tokens=1, ignore_eos=True))[0]
            for _ in range(num_probes)
        ]
        tpot_probes = [
            (await _timed(client, prompt_token_ids=[7] * 16, max_tokens=33, ignore_eos=True))[1]
            for _ in range(num_probes)
        ]
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
    return results, ttft_probes, tpot_probes


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)

    from services.common.procs import LocalMesh
    from services.simulator.cluster import Simulator
    from services.simulator.profiles import get_profile
    from services.worker.engine.cost_model import CostModel
    from services.worker.engine.sampling_params import SamplingParams
    from services.worker.engine.scheduler import ScheduledRequest, SchedulerOutput

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
        real, ttft_probes, tpot_probes = asyncio.run(
            _play(mesh.gateway_address, requests, args.probes)
        )
    finally:
        mesh.stop()
    if any(n != r.num_output_tokens for (_, _, n), r in zip(real, requests, strict=True)):
        print("MISMATCH: a request did not produce all its tokens", flush=True)
        return 1
    tpots = [t for _, t, n in real if n > 1]
    real_ttft = sum(t for t, _, _ in real) / len(real)
    real_tpot = sum(tpots) / len(tpots)

    # What the live mesh adds around the engine, from the probes: per step (the worker's
    # serving loop) = decode probe TPOT - modelled one-request decode step; per request
    # (gateway, dispatch RPC, submit, stream) = one-token probe TTFT - modelled one-token
    # prefill step - the per-step part.
    profile = get_profile(args.profile)
    cost = CostModel(profile.cost_profile)
    params = SamplingParams(max_tokens=1)
    prefill_s = cost.step_time(
        SchedulerOutput(requests=[ScheduledRequest("p", [7], 0, [0], params, True)])
    )
    decode_s = cost.step_time(
        SchedulerOutput(requests=[ScheduledRequest("p", [7], 32, [0, 1, 2], params, True)])
    )
    step_overhead_s = dispatch_s = 0.0
    if args.model_overhead:
        step_overhead_s = max(0.0, statistics.median(tpot_probes) - decode_s)
        dispatch_s = max(0.0, statistics.median(ttft_probes) - prefill_s - step_overhead_s)
    config = dataclasses.replace(
        job.config,
        profile=args.profile,
        migration="none",
        dispatch_latency_s=dispatch_s,
        step_overhead_s=step_overhead_s,
    )
    summary = Simulator(config, requests, profile).run().summary
    out = {
        "real_mean_ttft_s": round(real_ttft, 6),
        "sim_mean_ttft_s": round(summary.mean_ttft_s, 6),
        "real_mean_tpot_s": round(real_tpot, 6),
        "sim_mean_tpot_s": round(summary.mean_tpot_s, 6),
        "ttft_error": round(summary.mean_ttft_s / real_ttft - 1, 4),
        "tpot_error": round(summary.mean_tpot_s / real_tpot - 1, 4),
        "mesh_dispatch_latency_s": round(dispatch_s, 6),
        "mesh_step_overhead_s": round(step_overhead_s, 6),
        "requests": len(requests),
        "rate": args.rate,
        "workers": args.workers,
        "profile": args.profile,
    }
    out["within_25pct"] = abs(out["ttft_error"]) <= 0.25 and abs(out["tpot_error"]) <= 0.25
    print(
        f"mesh overheads from probes: {dispatch_s * 1e3:.2f} ms per request, "
        f"{step_overhead_s * 1e3:.2f} ms per step"
    )
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
