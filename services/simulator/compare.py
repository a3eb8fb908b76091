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
from services.simulator.cluster import Simulator
from services.simulator.config import SimConfig
from services.simulator.metrics import percentile
from services.simulator.result import SimResult
from services.simulator.workload import WorkloadConfig, generate, parse_length

POLICY_NAMES = ("round_robin", "load_balance", "llumnix", "llumnix_no_defrag")
# The report's experiments, in its order; `CompareConfig.parts` picks some of them.
PARTS = ("compare", "priority", "autoscale", "fidelity")
# Replica r of a priority run runs the migration loop every interval_s + r * this: the
# same system, its decisions falling at other instants (see `priority_jobs`).
REPLICA_INTERVAL_STEP_S = 1e-4
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
    # Experiments to run (a subset of PARTS); the report has only their keys.
    parts: tuple[str, ...] = PARTS
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
    # Runs of each seed and side, replica r with the migration loop every 50 + 0.1 r ms.
    # One run's per-seed P99 moves by up to ±25% under such a change alone (the few
    # requests of the worst burst are reshuffled); a seed's P99s are the mean of its
    # replicas' and `per_seed` shows how far one run strays from that mean.
    priority_replicas: int = 3
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
            self.priority_replicas >= 1,
            f"priority_replicas={self.priority_replicas} must be >= 1",
        )
        require(
            bool(self.parts) and set(self.parts) <= set(PARTS),
            f"parts={self.parts} must be a non-empty subset of {PARTS}",
        )
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
    # Also return every request's TTFT and TPOT by class (for percentiles pooled over jobs).
    keep_ttfts: bool = False


def run_job(job: Job) -> dict[str, Any]:
    """Runs one simulation and boils it down to plain data (picklable, JSON-able)."""
    result = Simulator(job.config, generate(job.workload)).run()
    ttfts = {}
    if job.keep_ttfts:
        classes = {"high": lambda r: r.priority > 0, "normal": lambda r: r.priority <= 0}
        ttfts["ttfts"] = {
            cls: [r.ttft_s for r in result.records if is_cls(r)] for cls, is_cls in classes.items()
        }
        ttfts["tpots"] = {
            cls: [r.tpot_s for r in result.records if is_cls(r) and r.num_generated > 1]
            for cls, is_cls in classes.items()
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
    """Per workload seed i and replica r: `priority/with/i/r` and `priority/without/i/r`
    (same requests). Replica r runs the migration loop every `interval_s + r * 0.1 ms`
    on both sides: r = 0 is the plain run, the others are the same system whose
    decisions fall at slightly other instants."""
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
        for r in range(cfg.priority_replicas):
            for side, config in (("with", with_priority), ("without", without)):
                interval_s = round(
                    config.migration_config.interval_s + r * REPLICA_INTERVAL_STEP_S, 9
                )
                config = dataclasses.replace(
                    config,
                    migration_config=dataclasses.replace(
                        config.migration_config, interval_s=interval_s
                    ),
                )
                jobs.append(Job(f"priority/{side}/{i}/{r}", config, workload, keep_ttfts=True))
    return jobs


def pooled_priority(cfg: CompareConfig, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """P99 TTFT per class over the requests of every seed and replica, with and without
    priority support. Per seed: each class's P99 TTFT and TPOT (the mean of its
    replicas' P99s), the normal requests' cost and the high-priority requests' gain,
    and how far one replica's normal P99 strays from that mean (what one run resolves)."""
    seeds, replicas = range(cfg.priority_seeds), range(cfg.priority_replicas)

    def pooled_p99(side: str, cls: str, kind: str = "ttfts") -> float:
        pooled = [
            t
            for i in seeds
            for r in replicas
            for t in results[f"priority/{side}/{i}/{r}"][kind][cls]
        ]
        return round(percentile(np.array(pooled), 99), 6)

    def runs(side: str, i: int, cls: str, key: str) -> list[float]:
        return [results[f"priority/{side}/{i}/{r}"][cls][key] for r in replicas]

    per_seed = []
    for i in seeds:
        row: dict[str, Any] = {"seed": cfg.seed + i}
        for cls in ("high", "normal"):
            for metric in ("ttft", "tpot"):
                for side, suffix in (("with", ""), ("without", "_no_priority")):
                    row[f"{cls}_p99_{metric}{suffix}_s"] = _mean(
                        runs(side, i, cls, f"p99_{metric}_s")
                    )
        row["normal_p99_ttft_cost_pct"] = _change_pct(
            row["normal_p99_ttft_s"], row["normal_p99_ttft_no_priority_s"]
        )
        high, high_without = row["high_p99_ttft_s"], row["high_p99_ttft_no_priority_s"]
        row["high_p99_ttft_speedup"] = round(high_without / high, 2) if high else None
        row["normal_p99_ttft_one_run_spread_pct"] = max(
            abs(_change_pct(v, row["normal_p99_ttft_no_priority_s"]))
            for v in runs("without", i, "normal", "p99_ttft_s")
        )
        per_seed.append(row)
    return {
        "high_p99_ttft_s": pooled_p99("with", "high"),
        "high_p99_ttft_no_priority_s": pooled_p99("without", "high"),
        "normal_p99_ttft_s": pooled_p99("with", "normal"),
        "normal_p99_ttft_no_priority_s": pooled_p99("without", "normal"),
        "high_p99_tpot_s": pooled_p99("with", "high", "tpots"),
        "high_p99_tpot_no_priority_s": pooled_p99("without", "high", "tpots"),
        "max_normal_p99_ttft_cost_pct": max(row["normal_p99_ttft_cost_pct"] for row in per_seed),
        "rate": cfg.priority_rate or max(cfg.rates),
        "seeds": [cfg.seed + i for i in seeds],
        "replicas": cfg.priority_replicas,
        "headroom_blocks": cfg.high_priority_headroom_blocks,
        "per_seed": per_seed,
    }


def _mean(values: Sequence[float | None]) -> float | None:
    """None when a run had no such requests (e.g. no TPOT: every output one token)."""
    if any(v is None for v in values):
        return None
    return round(sum(values) / len(values), 6)


def _change_pct(value: float, reference: float) -> float:
    """value vs reference in percent (+ = value is larger), one decimal."""
    return round((value / reference - 1) * 100, 1)


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
    makers = {
        "compare": compare_jobs,
        "priority": priority_jobs,
        "autoscale": autoscale_jobs,
        "fidelity": fidelity_jobs,
    }
    jobs = [job for part in cfg.parts for job in makers[part](cfg)]
    # Longest first keeps the pool busy to the end.
    jobs.sort(key=lambda j: -j.workload.num_requests)
    results = run_jobs(jobs, cfg.workers, progress)
    return build_report(cfg, results, real_fidelity)


def build_report(
    cfg: CompareConfig,
    results: dict[str, dict[str, Any]],
    real_fidelity: dict[str, float] | None = None,
) -> dict[str, Any]:
    """The report object of the experiments in `cfg.parts`, then `config`."""
    report: dict[str, Any] = {}
    if "compare" in cfg.parts:
        report["compare"] = _compare_rows(cfg, results)
    if "priority" in cfg.parts:
        report["priority"] = pooled_priority(cfg, results)
    if "autoscale" in cfg.parts:
        scaled, fixed = results["autoscale/scaled"], results["autoscale/fixed"]
        report["autoscale"] = {
            "instance_seconds": scaled["instance_seconds"],
            "instance_seconds_fixed": fixed["instance_seconds"],
            "p99_ttft_s": scaled["p99_ttft_s"],
            "p99_ttft_fixed_s": fixed["p99_ttft_s"],
            "timeline": scaled["timeline"],
        }
    if "fidelity" in cfg.parts:
        sim_fid = results["fidelity/sim"]
        real = real_fidelity or {}
        report["fidelity"] = {
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
        }
    if "compare" in cfg.parts:
        top = f"compare/{max(cfg.rates):g}/llumnix"
        report["wall_seconds_16x10k"] = results[top]["wall_s"]
        report["cpu_seconds_16x10k"] = results[top]["cpu_s"]
    report["config"] = {
        "num_instances": cfg.num_instances,
        "num_requests": cfg.num_requests,
        "profile": cfg.profile,
        "arrival": cfg.arrival,
        "cv": cfg.cv,
        "prompt": cfg.prompt,
        "output": cfg.output,
        "seed": cfg.seed,
        "parts": list(cfg.parts),
        "priority_seeds": cfg.priority_seeds,
        "priority_replicas": cfg.priority_replicas,
        "workers": cfg.workers,
        "cpus": os.cpu_count(),
    }
    return report


def _compare_rows(cfg: CompareConfig, results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
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
    return [
        {"rate": rate, "policy": name, **{k: results[f"compare/{rate:g}/{name}"][k] for k in keys}}
        for rate in cfg.rates
        for name in POLICY_NAMES
    ]
