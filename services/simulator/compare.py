"""The comparison report behind `llmesh simulate --compare`.

Four experiments on one cluster shape (16 instances of the `llama-7b-a10` profile by
default), each a set of independent simulations run on a process pool:

    compare     round_robin / load_balance / llumnix / llumnix_no_defrag at three rates
    priority    10% high-priority requests, Llumnix with and without priority support,
                over several workload seeds (P99s pool their requests)
    autoscale   a load that rises and falls: auto-scaled fleet vs a fixed one
    fidelity    4 tiny-model instances on the calibrated profile (the sim side of the
                real-mesh comparison; the real side, and what the simulator must know
                about the live mesh, come from `llmesh bench simulator_fidelity`)

The default workload is the one docs/simulator.md describes: bursty Gamma arrivals
(CV 2) with long-tailed (bounded power law) prompt and output lengths.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from services.common.config import ConfigError, require
from services.policies import LoadModelConfig, ScalingConfig
from services.simulator.cluster import SimResult, Simulator
from services.simulator.config import SimConfig
from services.simulator.metrics import percentile
from services.simulator.workload import WorkloadConfig, generate, parse_length

POLICY_NAMES = ("round_robin", "load_balance", "llumnix", "llumnix_no_defrag")
# Lengths of the fidelity workload (the tiny model's context is 2,048 tokens).
FIDELITY_PROMPT = "uniform:16:128"
FIDELITY_OUTPUT = "uniform:16:64"


def policy_config(name: str, base: SimConfig) -> SimConfig:
    """`base` turned into one of the compared systems."""
    if name == "round_robin":
        return dataclasses.replace(base, dispatch="round_robin", migration="none")
    if name == "load_balance":  # INFaaS++-like: load-aware dispatch, no migration
        return dataclasses.replace(base, dispatch="load_balance", migration="none")
    if name == "llumnix":
        return dataclasses.replace(base, dispatch="freest", migration="freeness")
    if name == "llumnix_no_defrag":
        load_model = dataclasses.replace(base.load_model, enable_defrag=False)
        return dataclasses.replace(
            base, dispatch="freest", migration="freeness", load_model=load_model
        )
    raise ConfigError(f"policy {name!r} is not one of {POLICY_NAMES}")


@dataclass(frozen=True)
class CompareConfig:
    """What `--compare` runs (every field has a CLI flag)."""

    num_instances: int = 16
    num_requests: int = 10_000
    profile: str = "llama-7b-a10"
    # Mean request rates (req/s) of the policy comparison, low to high.
    rates: tuple[float, ...] = (18.0, 21.0, 22.5)
    arrival: str = "gamma"
    cv: float = 2.0
    prompt: str = "zipf:1.5:16:4000"
    output: str = "zipf:1.5:16:4000"
    seed: int = 0
    # Priority run: rate (None = the highest of `rates`; priorities only matter when
    # requests queue, so the default runs just past the highest compare rate), share of
    # high-priority requests, headroom reserved per running high-priority request.
    priority_rate: float | None = 23.0
    high_priority_fraction: float = 0.1
    high_priority_headroom_blocks: int = 8
    # Workload seeds of the priority run (seed, seed + 1, ...). Its P99s are over the
    # requests of all of them: one seed's P99 swings by 50% and more with where its
    # bursts fall (measured: 5 s to 42 s at the default rate), which would drown the
    # 10% effect the run measures.
    priority_seeds: int = 4
    # Auto-scaling run: a repeating (duration_s, rate) schedule; fleet bounds.
    autoscale_schedule: tuple[tuple[float, float], ...] = ((120.0, 6.0), (120.0, 20.0))
    autoscale_min_instances: int = 4
    # Fidelity run (sim side): instances, requests, rate, profile, seed (None = `seed`),
    # and the live mesh's measured costs (SimConfig.dispatch_latency_s, step_overhead_s,
    # host_cores, stream_cpu_per_token_s; `llmesh bench simulator_fidelity` measures them
    # and writes them out).
    fidelity_instances: int = 4
    fidelity_requests: int = 300
    fidelity_rate: float = 2.0
    fidelity_profile: str = "tiny-cpu"
    fidelity_seed: int | None = None
    fidelity_dispatch_latency_s: float = 0.0
    fidelity_step_overhead_s: float = 0.0
    fidelity_host_cores: float | None = None
    fidelity_stream_cpu_per_token_s: float = 0.0
    # Processes running simulations side by side.
    workers: int = 2

    def __post_init__(self) -> None:
        require(
            bool(self.rates) and all(r > 0 for r in self.rates),
            f"rates={self.rates} must be positive and non-empty",
        )
        require(self.workers >= 1, f"workers={self.workers} must be >= 1")
        require(self.priority_seeds >= 1, f"priority_seeds={self.priority_seeds} must be >= 1")
        require(
            1 <= self.autoscale_min_instances <= self.num_instances,
            f"autoscale_min_instances={self.autoscale_min_instances} must be in "
            f"[1, num_instances={self.num_instances}]",
        )
        parse_length(self.prompt), parse_length(self.output)  # validates the specs

    def workload(self, rate: float, **changes: Any) -> WorkloadConfig:
        return WorkloadConfig(
            num_requests=self.num_requests,
            rate=rate,
            arrival=self.arrival,
            cv=self.cv,
            prompt=parse_length(self.prompt),
            output=parse_length(self.output),
            seed=self.seed,
            **changes,
        )

    def base(self) -> SimConfig:
        return SimConfig(num_instances=self.num_instances, profile=self.profile)


@dataclass(frozen=True)
class Job:
    """One simulation: a label for the report, the cluster, the workload."""

    label: str
    config: SimConfig
    workload: WorkloadConfig
    # Also return every request's TTFT by class (for percentiles pooled over jobs).
    keep_ttfts: bool = False


def run_job(job: Job) -> dict[str, Any]:
    """Runs one simulation and boils it down to plain data (picklable, JSON-able)."""
    result = Simulator(job.config, generate(job.workload)).run()
    ttfts = {}
    if job.keep_ttfts:
        ttfts["ttfts"] = {
            "high": [r.ttft_s for r in result.records if r.priority > 0],
            "normal": [r.ttft_s for r in result.records if r.priority <= 0],
        }
    return {
        "label": job.label,
        **result.summary.to_dict(),
        "high": result.summary_for(is_high_priority=True).to_dict(),
        "normal": result.summary_for(is_high_priority=False).to_dict(),
        "makespan_s": round(result.makespan_s, 3),
        "instance_seconds": round(result.instance_seconds, 1),
        "wall_s": round(result.wall_s, 2),
        "cpu_s": round(result.cpu_s, 2),
        "num_steps": result.num_steps,
        "max_downtime_s": round(result.migration.max_downtime_s, 6),
        "timeline": _thin(result),
        **ttfts,
    }


def _thin(result: SimResult, max_points: int = 400) -> list[tuple[float, int]]:
    timeline = result.instance_timeline
    step = max(1, len(timeline) // max_points)
    return [(round(t, 2), n) for t, n in timeline[::step]]


def run_jobs(
    jobs: Sequence[Job], workers: int, progress: Callable[[str], None] | None = None
) -> dict[str, dict[str, Any]]:
    """Results by label; with workers > 1 on a process pool (each simulation is serial)."""
    results: dict[str, dict[str, Any]] = {}
    if workers == 1:
        for job in jobs:
            results[job.label] = run_job(job)
            if progress:
                progress(_progress_line(results[job.label]))
        return results
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
        for result in pool.map(run_job, jobs):
            results[result["label"]] = result
            if progress:
                progress(_progress_line(result))
    return results


def _progress_line(r: dict[str, Any]) -> str:
    return (
        f"  done {r['label']}: p99 TTFT {r['p99_ttft_s']}s, {r['num_requests']} requests, "
        f"{r['wall_s']}s wall"
    )


# ---- the experiments ------------------------------------------------------------------


def compare_jobs(cfg: CompareConfig) -> list[Job]:
    base = cfg.base()
    return [
        Job(f"compare/{rate:g}/{name}", policy_config(name, base), cfg.workload(rate))
        for rate in cfg.rates
        for name in POLICY_NAMES
    ]


def priority_jobs(cfg: CompareConfig) -> list[Job]:
    """Per workload seed i: `priority/with/i` and `priority/without/i` (same requests)."""
    rate = cfg.priority_rate or max(cfg.rates)
    llumnix = policy_config("llumnix", cfg.base())
    with_priority = dataclasses.replace(
        llumnix,
        scheduling_policy="priority",
        load_model=LoadModelConfig(high_priority_headroom_blocks=cfg.high_priority_headroom_blocks),
    )
    without = dataclasses.replace(llumnix, use_priorities=False)
    base = cfg.workload(rate, high_priority_fraction=cfg.high_priority_fraction)
    jobs = []
    for i in range(cfg.priority_seeds):
        workload = dataclasses.replace(base, seed=cfg.seed + i)
        jobs.append(Job(f"priority/with/{i}", with_priority, workload, keep_ttfts=True))
        jobs.append(Job(f"priority/without/{i}", without, workload, keep_ttfts=True))
    return jobs


def pooled_priority(cfg: CompareConfig, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """P99 TTFT per class over the requests of every seed, with and without priority
    support; each seed's own P99s alongside."""
    seeds = range(cfg.priority_seeds)

    def p99(side: str, cls: str) -> float:
        pooled = [t for i in seeds for t in results[f"priority/{side}/{i}"]["ttfts"][cls]]
        return round(percentile(np.array(pooled), 99), 6)

    return {
        "high_p99_ttft_s": p99("with", "high"),
        "high_p99_ttft_no_priority_s": p99("without", "high"),
        "normal_p99_ttft_s": p99("with", "normal"),
        "normal_p99_ttft_no_priority_s": p99("without", "normal"),
        "rate": cfg.priority_rate or max(cfg.rates),
        "seeds": [cfg.seed + i for i in seeds],
        "per_seed": [
            {
                "seed": cfg.seed + i,
                **{
                    f"{cls}_p99_ttft{suffix}_s": results[f"priority/{side}/{i}"][cls]["p99_ttft_s"]
                    for cls in ("high", "normal")
                    for side, suffix in (("with", ""), ("without", "_no_priority"))
                },
            }
            for i in seeds
        ],
    }


def autoscale_jobs(cfg: CompareConfig) -> list[Job]:
    workload = cfg.workload(1.0, rate_schedule=cfg.autoscale_schedule)
    fixed = policy_config("llumnix", cfg.base())
    scaled = dataclasses.replace(
        fixed,
        num_instances=cfg.autoscale_min_instances,
        scaling=ScalingConfig(
            min_instances=cfg.autoscale_min_instances, max_instances=cfg.num_instances
        ),
    )
    return [Job("autoscale/scaled", scaled, workload), Job("autoscale/fixed", fixed, workload)]


def fidelity_jobs(cfg: CompareConfig) -> list[Job]:
    config = SimConfig(
        num_instances=cfg.fidelity_instances,
        profile=cfg.fidelity_profile,
        # The real workers' engine defaults (EngineConfig): the sim must match them.
        max_num_seqs=64,
        max_num_batched_tokens=512,
        # The bench runs the live scheduler with freest dispatch and no migration loop.
        dispatch="freest",
        migration="none",
        dispatch_latency_s=cfg.fidelity_dispatch_latency_s,
        step_overhead_s=cfg.fidelity_step_overhead_s,
        host_cores=cfg.fidelity_host_cores,
        stream_cpu_per_token_s=cfg.fidelity_stream_cpu_per_token_s,
    )
    workload = WorkloadConfig(
        num_requests=cfg.fidelity_requests,
        rate=cfg.fidelity_rate,
        arrival="poisson",
        prompt=parse_length(FIDELITY_PROMPT),
        output=parse_length(FIDELITY_OUTPUT),
        max_total_tokens=2048,
        seed=cfg.seed if cfg.fidelity_seed is None else cfg.fidelity_seed,
    )
    return [Job("fidelity/sim", config, workload)]


def run_compare(
    cfg: CompareConfig,
    progress: Callable[[str], None] | None = None,
    real_fidelity: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Runs every experiment; returns the report object (the JSON of the last line)."""
    jobs = compare_jobs(cfg) + priority_jobs(cfg) + autoscale_jobs(cfg) + fidelity_jobs(cfg)
    # Longest first keeps the pool busy to the end.
    jobs.sort(key=lambda j: -j.workload.num_requests)
    results = run_jobs(jobs, cfg.workers, progress)
    return build_report(cfg, results, real_fidelity)


def build_report(
    cfg: CompareConfig,
    results: dict[str, dict[str, Any]],
    real_fidelity: dict[str, float] | None = None,
) -> dict[str, Any]:
    keys = (
        "mean_ttft_s",
        "p99_ttft_s",
        "mean_tpot_s",
        "p99_tpot_s",
        "p99_e2e_s",
        "preemptions",
        "preemption_loss_s",
        "migrations",
    )
    compare = [
        {"rate": rate, "policy": name, **{k: results[f"compare/{rate:g}/{name}"][k] for k in keys}}
        for rate in cfg.rates
        for name in POLICY_NAMES
    ]
    scaled, fixed = results["autoscale/scaled"], results["autoscale/fixed"]
    sim_fid = results["fidelity/sim"]
    top = f"compare/{max(cfg.rates):g}/llumnix"
    real = real_fidelity or {}
    return {
        "compare": compare,
        "priority": pooled_priority(cfg, results),
        "autoscale": {
            "instance_seconds": scaled["instance_seconds"],
            "instance_seconds_fixed": fixed["instance_seconds"],
            "p99_ttft_s": scaled["p99_ttft_s"],
            "p99_ttft_fixed_s": fixed["p99_ttft_s"],
            "timeline": scaled["timeline"],
        },
        "fidelity": {
            "real_mean_ttft_s": real.get("mean_ttft_s"),
            "sim_mean_ttft_s": sim_fid["mean_ttft_s"],
            "real_mean_tpot_s": real.get("mean_tpot_s"),
            "sim_mean_tpot_s": sim_fid["mean_tpot_s"],
            # What the simulator was told about the live mesh (0 / None: ideal serving).
            "sim_dispatch_latency_s": cfg.fidelity_dispatch_latency_s,
            "sim_step_overhead_s": cfg.fidelity_step_overhead_s,
            "sim_host_cores": cfg.fidelity_host_cores,
            "sim_stream_cpu_per_token_s": cfg.fidelity_stream_cpu_per_token_s,
            "note": real.get(
                "note",
                "real side not measured in this run: `llmesh bench simulator_fidelity "
                "--out F.json` plays the same workload on a 4-worker mesh; pass "
                "--fidelity-real F.json",
            ),
        },
        "wall_seconds_16x10k": results[top]["wall_s"],
        "cpu_seconds_16x10k": results[top]["cpu_s"],
        "config": {
            "num_instances": cfg.num_instances,
            "num_requests": cfg.num_requests,
            "profile": cfg.profile,
            "arrival": cfg.arrival,
            "cv": cfg.cv,
            "prompt": cfg.prompt,
            "output": cfg.output,
            "seed": cfg.seed,
            "priority_seeds": cfg.priority_seeds,
            "workers": cfg.workers,
            "cpus": os.cpu_count(),
        },
    }
