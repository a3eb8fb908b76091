"""`llmesh bench simulator_fidelity`: one small workload on a real mesh and in the simulator.

The workload is the comparison report's fidelity workload (services/simulator/compare.py:
Poisson arrivals, 16-128-token prompts, 16-64 new tokens, greedy, no EOS stop) played
open-loop against a local mesh of 4 tiny-model workers (each request is sent at its
arrival time), then simulated with 4 instances of a cost-model profile (default the
built-in `tiny-cpu`; pass the JSON `llmesh calibrate --model tiny --threads 1` wrote on
this machine for a meaningful figure). Both sides run freest dispatch without
migration: the live scheduler gets `--migration-policy none`.

    real TTFT   first streamed chunk - send time
    real TPOT   (last chunk - first chunk) / (tokens - 1)

Besides the profile, the simulator is told what the live mesh adds (`--no-model-overhead`
leaves all of it out, i.e. ideal serving on one accelerator per instance):

- mesh overheads, from probes sent one at a time to the idle mesh before the workload
  (means: the comparison is of means): per step (the worker's serving loop) = TPOT of
  33-token decode probes - the modelled decode step; per request (gateway, dispatch RPC,
  submit, first chunk back) = TTFT of one-token probes whose prompt has the workload's
  mean length - the modelled prefill of that prompt - the per-step part. They become
  `step_overhead_s` and `dispatch_latency_s`.
- the machine: workers, gateway, scheduler and this client are processes sharing this
  machine's cores, whereas each simulated instance has its own accelerator unless
  `host_cores` is set. The bench sets it to the CPUs it may use (`--host-cores`), and
  `stream_cpu_per_token_s` to the gateway + scheduler + client CPU time per token during
  the decode probes. The simulator then runs every step, every request's dispatch
  latency and the streaming of every step's tokens as jobs sharing those cores
  (processor sharing, services/simulator/host.py): four workers mid-step on two cores
  each take twice as long, and so does a request's way in while they run.

Not modelled: Linux scheduling granularity and wake-up latency (processor sharing is
idealised) and load reports ~50 ms old (the simulator dispatches on exact loads). Keep
the rate low enough that the cores are not saturated: the default 2 req/s keeps the
mesh at about half of 2 cores. Other load on the machine (another job's tests, say)
slows the real side (and the probes) unevenly: the bench measures the CPU the workers,
the front-end and everything else used during the workload and warns when everything
else took more than 0.2 cores. Mean TTFT and mean TPOT should agree within 25%.

The last stdout line is JSON; `--out FILE` also writes it, for
`llmesh simulate --compare --fidelity-real FILE`, which re-simulates the workload with
the `sim_config` recorded there.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench import _cpu

# Other load (cores) on the machine during the workload above which the real figures
# are not to be trusted.
OTHER_LOAD_WARN_CORES = 0.2


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="llmesh bench simulator_fidelity", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--json", action="store_true", help="(the JSON line is always last)")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--rate", type=float, default=2.0, help="mean request rate (req/s)")
    parser.add_argument("--profile", default="tiny-cpu", help="cost-model profile or JSON path")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument(
        "--host-cores",
        type=float,
        default=None,
        help="cores the simulated instances share (default: the CPUs this bench may use; "
        "0: one accelerator per instance)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--probes", type=int, default=20, help="probes of each kind")
    parser.add_argument(
        "--no-model-overhead",
        dest="model_overhead",
        action="store_false",
        help="simulate ideal serving: no mesh overheads, no shared cores",
    )
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("--log-dir", default=None, help="where the mesh processes log")
    args = parser.parse_args(argv)
    for name in ("workers", "requests", "threads", "probes"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be > 0")
    if args.rate <= 0:
        parser.error("--rate must be > 0")
    if args.host_cores is not None and args.host_cores < 0:
        parser.error("--host-cores must be >= 0")
    return args


def _compare_config(args, **measured):
    from services.simulator.compare import CompareConfig

    return CompareConfig(
        fidelity_instances=args.workers,
        fidelity_requests=args.requests,
        fidelity_rate=args.rate,
        fidelity_profile=args.profile,
        fidelity_seed=args.seed,
        **measured,
    )


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


@dataclasses.dataclass
class Probes:
    """What the probes measured on the idle mesh."""

    prompt_len: int  # of the TTFT probes: the workload's mean prompt length
    ttfts: list[float]  # one-token requests
    tpots: list[float]  # 33-token requests with 16-token prompts
    stream_cpu_per_token_s: float | None  # front-end CPU per token during the TPOT probes


async def _probe(address: str, num_probes: int, prompt_len: int, front_pids: list[int]) -> Probes:
    """One request at a time on the idle mesh."""
    from gateway.client import AsyncClient

    num_decode_tokens = 33
    async with AsyncClient(address, timeout_s=600) as client:
        await client.generate(prompt_token_ids=[1, 2, 3], max_tokens=2, ignore_eos=True)
        ttfts = [
            (
                await _timed(
                    client, prompt_token_ids=_prompt(i, prompt_len), max_tokens=1, ignore_eos=True
                )
            )[0]
            for i in range(num_probes)
        ]
        cpu_before = _cpu.processes_cpu_s(front_pids)
        tpots = [
            (
                await _timed(
                    client,
                    prompt_token_ids=[7] * 16,
                    max_tokens=num_decode_tokens,
                    ignore_eos=True,
                )
            )[1]
            for _ in range(num_probes)
        ]
        cpu_after = _cpu.processes_cpu_s(front_pids)
    stream_cpu = None
    if cpu_before is not None and cpu_after is not None:
        stream_cpu = (cpu_after - cpu_before) / (num_probes * num_decode_tokens)
    return Probes(prompt_len, ttfts, tpots, stream_cpu)


async def _play(address: str, requests) -> list[tuple[float, float, int]]:
    """(ttft_s, tpot_s or nan, num_tokens) per request, open loop."""
    from gateway.client import AsyncClient

    results: list[tuple[float, float, int]] = [(0.0, 0.0, 0)] * len(requests)
    async with AsyncClient(address, timeout_s=600) as client:
        start = time.perf_counter()

        async def one(i: int) -> None:
            r = requests[i]
            await asyncio.sleep(max(0.0, start + r.arrival_s - time.perf_counter()))
            ttft, tpot = 0.0, float("nan")
            sent = time.perf_counter()
            first = last = None
            num_tokens = 0
            async for chunk in client.generate_stream(
                prompt_token_ids=_prompt(i, r.num_prompt_tokens),
                max_tokens=r.num_output_tokens,
                ignore_eos=True,
            ):
                if chunk.token_ids:
                    last = time.perf_counter()
                    first = first or last
                    num_tokens += len(chunk.token_ids)
            assert first is not None and last is not None
            ttft = first - sent
            if num_tokens > 1:
                tpot = (last - first) / (num_tokens - 1)
            results[i] = (ttft, tpot, num_tokens)

        await asyncio.gather(*(one(i) for i in range(len(requests))))
    return results


def _modelled_overheads(profile, probes: Probes) -> tuple[float, float]:
    """(dispatch_latency_s, step_overhead_s): what the probes took beyond the cost model,
    on average (the comparison is of means: the path's occasional hiccups count)."""
    from services.worker.engine.cost_model import CostModel
    from services.worker.engine.sampling_params import SamplingParams
    from services.worker.engine.scheduler import ScheduledRequest, SchedulerOutput

    cost = CostModel(profile.cost_profile)
    params = SamplingParams(max_tokens=1)
    # (Block ids do not matter to the cost model.)
    prefill_s = cost.step_time(
        SchedulerOutput(
            requests=[ScheduledRequest("p", [7] * probes.prompt_len, 0, [0], params, True)]
        )
    )
    # A decode step in the middle of a 16 + 33-token request.
    decode_s = cost.step_time(
        SchedulerOutput(requests=[ScheduledRequest("p", [7], 32, [0], params, True)])
    )
    step_overhead_s = max(0.0, statistics.mean(probes.tpots) - decode_s)
    dispatch_s = max(0.0, statistics.mean(probes.ttfts) - prefill_s - step_overhead_s)
    return dispatch_s, step_overhead_s


@dataclasses.dataclass
class CpuUsage:
    """Mean cores used during the workload (None where /proc cannot be read)."""

    elapsed_s: float
    workers: float | None
    front_end: float | None  # gateway, scheduler and this client
    other: float | None  # everything else on the machine


def _run_real(args, requests, prompt_len: int) -> tuple[list, Probes, CpuUsage]:
    """Probes, then the workload, on a fresh local mesh."""
    from services.common.procs import LocalMesh

    mesh = LocalMesh(
        log_dir=Path(args.log_dir or tempfile.mkdtemp(prefix="llmesh-bench-fidelity-")),
        num_workers=args.workers,
        worker_args=("--torch-threads", str(args.threads), "--log-level", "WARNING"),
        gateway_args=("--log-level", "WARNING"),
        scheduler_args=(
            "--migration-policy",
            "none",
            "--group-policy",
            "none",
            "--log-level",
            "WARNING",
        ),  # fmt: skip
    ).start()
    try:
        worker_pids = [w.pid for w in mesh.workers]
        front_pids = [mesh.gateway.pid, mesh.scheduler.pid, os.getpid()]
        probes = asyncio.run(_probe(mesh.gateway_address, args.probes, prompt_len, front_pids))

        def sample():
            return (
                _cpu.processes_cpu_s(worker_pids),
                _cpu.processes_cpu_s(front_pids),
                _cpu.machine_busy_s(),
            )

        before, start = sample(), time.perf_counter()
        real = asyncio.run(_play(mesh.gateway_address, requests))
        after, elapsed = sample(), time.perf_counter() - start
    finally:
        mesh.stop()
    workers, front_end, busy = (
        None if a is None or b is None else (b - a) / elapsed
        for a, b in zip(before, after, strict=True)
    )
    other = None
    if workers is not None and front_end is not None and busy is not None:
        other = max(0.0, busy - workers - front_end)
    return real, probes, CpuUsage(elapsed, workers, front_end, other)


def _measured_costs(args, profile, probes: Probes) -> dict[str, float | None]:
    """The CompareConfig.fidelity_* fields that describe the live mesh to the simulator."""
    if not args.model_overhead:
        return {
            "fidelity_dispatch_latency_s": 0.0,
            "fidelity_step_overhead_s": 0.0,
            "fidelity_host_cores": None,
            "fidelity_stream_cpu_per_token_s": 0.0,
        }
    dispatch_s, step_overhead_s = _modelled_overheads(profile, probes)
    host_cores = _cpu.available_cores() if args.host_cores is None else args.host_cores
    return {
        "fidelity_dispatch_latency_s": round(dispatch_s, 6),
        "fidelity_step_overhead_s": round(step_overhead_s, 6),
        "fidelity_host_cores": host_cores or None,
        "fidelity_stream_cpu_per_token_s": (
            round(probes.stream_cpu_per_token_s, 6)
            if host_cores and probes.stream_cpu_per_token_s is not None
            else 0.0
        ),
    }


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)

    from services.simulator.cluster import Simulator
    from services.simulator.compare import fidelity_jobs
    from services.simulator.profiles import get_profile
    from services.simulator.workload import generate

    (job,) = fidelity_jobs(_compare_config(args))
    requests = generate(job.workload)
    prompt_len = round(statistics.mean(r.num_prompt_tokens for r in requests))
    print(
        f"workload: {len(requests)} requests, Poisson {args.rate}/s, {args.workers} tiny workers "
        f"({args.threads} torch thread(s) each), profile {args.profile}, "
        f"{_cpu.available_cores()} CPU(s)",
        flush=True,
    )
    real, probes, usage = _run_real(args, requests, prompt_len)
    if any(n != r.num_output_tokens for (_, _, n), r in zip(real, requests, strict=True)):
        print("MISMATCH: a request did not produce all its tokens", flush=True)
        return 1
    tpots = [t for _, t, n in real if n > 1]
    real_ttft = sum(t for t, _, _ in real) / len(real)
    real_tpot = sum(tpots) / len(tpots)

    profile = get_profile(args.profile)
    measured = _measured_costs(args, profile, probes)
    cfg = _compare_config(args, **measured)
    (job,) = fidelity_jobs(cfg)
    summary = Simulator(job.config, requests, profile).run().summary
    out = {
        "real_mean_ttft_s": round(real_ttft, 6),
        "sim_mean_ttft_s": round(summary.mean_ttft_s, 6),
        "real_mean_tpot_s": round(real_tpot, 6),
        "sim_mean_tpot_s": round(summary.mean_tpot_s, 6),
        "ttft_error": round(summary.mean_ttft_s / real_ttft - 1, 4),
        "tpot_error": round(summary.mean_tpot_s / real_tpot - 1, 4),
        "probe_mean_ttft_s": round(statistics.mean(probes.ttfts), 6),
        "probe_mean_tpot_s": round(statistics.mean(probes.tpots), 6),
        "workers_cpu_cores": _round(usage.workers),
        "front_end_cpu_cores": _round(usage.front_end),
        "other_cpu_cores": _round(usage.other),
        "requests": len(requests),
        "rate": args.rate,
        "workers": args.workers,
        "threads": args.threads,
        "profile": args.profile,
        # CompareConfig fields: `llmesh simulate --compare --fidelity-real` re-simulates
        # the workload with exactly these.
        "sim_config": {
            k: v for k, v in dataclasses.asdict(cfg).items() if k.startswith("fidelity_")
        },
    }
    out["within_25pct"] = abs(out["ttft_error"]) <= 0.25 and abs(out["tpot_error"]) <= 0.25
    _print_summary(out, measured, usage, probes)
    line = json.dumps(out)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(line + "\n")
    print(line)
    return 0


def _print_summary(out, measured, usage: CpuUsage, probes: Probes) -> None:
    print(
        f"probes (idle mesh, means): TTFT {out['probe_mean_ttft_s'] * 1e3:.2f} ms "
        f"({probes.prompt_len}-token prompt), TPOT {out['probe_mean_tpot_s'] * 1e3:.2f} ms"
    )
    stream = measured["fidelity_stream_cpu_per_token_s"]
    print(
        f"simulator given: {measured['fidelity_dispatch_latency_s'] * 1e3:.2f} ms per request, "
        f"{measured['fidelity_step_overhead_s'] * 1e3:.2f} ms per step, "
        + (
            f"{measured['fidelity_host_cores']:g} shared cores, "
            f"{stream * 1e3:.2f} ms of front-end CPU per token"
            if measured["fidelity_host_cores"]
            else "one accelerator per instance"
        )
    )
    if usage.other is not None:
        print(
            f"CPU during the workload ({usage.elapsed_s:.0f} s): workers {usage.workers:.2f} "
            f"cores, front-end (gateway, scheduler, client) {usage.front_end:.2f}, "
            f"other processes {usage.other:.2f}"
        )
        if usage.other > OTHER_LOAD_WARN_CORES:
            print(
                f"WARNING: other processes used {usage.other:.2f} cores during the workload; "
                "they slow the real side only. Re-run on a quiet machine."
            )
    print(
        f"mean TTFT  real {out['real_mean_ttft_s'] * 1e3:8.2f} ms   "
        f"sim {out['sim_mean_ttft_s'] * 1e3:8.2f} ms   ({out['ttft_error']:+.0%})"
    )
    print(
        f"mean TPOT  real {out['real_mean_tpot_s'] * 1e3:8.2f} ms   "
        f"sim {out['sim_mean_tpot_s'] * 1e3:8.2f} ms   ({out['tpot_error']:+.0%})"
    )


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


if __name__ == "__main__":
    sys.exit(main())
