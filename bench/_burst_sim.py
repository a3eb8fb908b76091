"""The simulator's prediction of `llmesh bench burst`: the same requests, 4 instances,
the live scheduler's knobs, and a cost model of the bench's model on this host.

    profile     `calibrate`: the torch executor of the bench model on probe batches
                shaped like the burst's (decodes of 1-24 requests, prefills of 64-512
                tokens), one torch thread like each worker, fastest of 3 rounds (about
                15 s), in CPU seconds: what a step costs one core, which the shared
                host below then divides among its jobs (wall-clock times on a loaded
                machine would count the contention twice); the pool is then sized from the workers' memory, so the
                simulated engine holds exactly the real worker's blocks
    mesh costs  from probes on the first mesh, idle, before its workload
                (bench/simulator_fidelity.py): per request (gateway, dispatch, first
                chunk back), per step (the worker's serving loop), and the front-end's
                CPU per streamed token
    host        4 workers, gateway, scheduler and client share this machine's cores:
                steps, request paths and streaming are jobs on `host_cores` cores
                (processor sharing, services/simulator/host.py), with the runnable
                threads of other processes measured during that policy's run as
                background jobs (bench/_cpu.BackgroundLoad)
    policy      the live scheduler's own config parsed from the bench's flags
                (`--policy P` + GROUP_KNOBS): the same group and migration knobs

`sim_config` below is everything a re-simulation needs (JSON-able), so that
`bench burst --resim FILE.json` re-predicts a recorded run without a mesh.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

# Calibration probes: (requests, context) decodes and (context, chunk) prefills that
# span the burst's batches (up to ~24 running requests per worker, contexts to ~800,
# chunks up to the worker's 512-token step budget).
DECODE_PROBES = [(b, c) for b in (1, 8, 24) for c in (64, 512)]
PREFILL_PROBES = [(0, 64), (0, 256), (0, 512), (256, 256)]
CALIBRATION_ROUNDS = 3
# KV bytes/s between two workers on this host: the exchange throughput of `bench
# kunserve_mechanism` (docs/kunserve.md: 1.6-1.7 GB/s over loopback).
LINK_BYTES_PER_S = 1.6e9


def calibrate(model_dir: Path, memory_nbytes: int, torch_threads: int = 1, num_processes: int = 1):
    """A cost-model profile of the bench model on this host (a CostModelProfile whose
    memory is the workers'), measured by `num_processes` engines at once
    (bench/_burst_calibrate.py: as many as the mesh has workers)."""
    import torch

    from bench._burst_calibrate import measure_concurrently
    from services.common.config import load_config
    from services.worker.engine.calibration import measure
    from services.worker.engine.config import EngineConfig
    from services.worker.engine.cost_model import fit_profile
    from services.worker.engine.loader import load_model_config

    threads = torch.get_num_threads()
    torch.set_num_threads(torch_threads)
    try:
        # Room for every probe's blocks at once (they are allocated together).
        probe_tokens = sum(b * c for b, c in DECODE_PROBES) + sum(c + n for c, n in PREFILL_PROBES)
        model = load_model_config(str(model_dir))
        kv_nbytes = probe_tokens * model.num_layers * model.kv_nbytes_per_token_per_layer("float32")
        config = load_config(
            EngineConfig,
            "ENGINE",
            {"model": str(model_dir), "memory_capacity_bytes": memory_nbytes + 2 * kv_nbytes},
        )
        if num_processes > 1:
            per_process = measure_concurrently(
                config,
                num_processes,
                CALIBRATION_ROUNDS,
                DECODE_PROBES,
                PREFILL_PROBES,
                torch_threads,
            )
            samples = [s for process in per_process for s in process]
        else:
            samples = measure(
                config,
                CALIBRATION_ROUNDS,
                lambda _line: None,
                DECODE_PROBES,
                PREFILL_PROBES,
                clock=time.process_time,
            )
    finally:
        torch.set_num_threads(threads)
    profile = fit_profile(
        name="bench-burst-cpu",
        model=model,
        dtype=config.dtype,
        samples=[(s.features, s.seconds) for s in samples],
        source=f"bench burst: {len(samples) // num_processes} probes x {CALIBRATION_ROUNDS} "
        f"rounds (fastest kept) in each of {num_processes} process(es) at once, "
        f"{torch_threads} torch thread(s) each",
        memory_capacity_bytes=memory_nbytes,
    )
    errors = [
        abs(
            sum(c * f for c, f in zip(profile.coefficients(), s.features, strict=True)) / s.seconds
            - 1
        )
        for s in samples
    ]
    return profile, sum(errors) / len(errors)


def mesh_costs(profile, probes, host_cores: float, probe_speed: float = 1.0) -> dict:
    """SimConfig fields for the live mesh's own costs, from the idle-mesh probes.

    The profile is in CPU seconds; so are the overheads: the probes' wall-clock times
    are scaled by the share of a core each of the mesh's runnable threads had meanwhile
    (`probe_speed`: CPU the mesh used / its runnable threads; other processes on a loaded
    machine take the rest)."""
    from bench.simulator_fidelity import _modelled_overheads
    from services.simulator.profiles import get_profile

    speed = min(1.0, probe_speed) if host_cores else 1.0
    cpu_probes = dataclasses.replace(
        probes,
        ttfts=[t * speed for t in probes.ttfts],
        tpots=[t * speed for t in probes.tpots],
    )
    dispatch_s, step_overhead_s = _modelled_overheads(get_profile(profile), cpu_probes)
    stream = probes.stream_cpu_per_token_s
    return {
        "dispatch_latency_s": round(dispatch_s, 6),
        "step_overhead_s": round(step_overhead_s, 6),
        "host_cores": host_cores or None,
        "stream_cpu_per_token_s": round(stream, 6) if host_cores and stream is not None else 0.0,
    }


def sim_requests(arrivals) -> list:
    """The bench's arrivals as the simulator's requests (times, prompt and output lengths)."""
    from services.simulator.workload import SimRequest

    return [
        SimRequest(str(k), a.at_s, len(a.request[0]), a.request[1]["max_tokens"])
        for k, a in enumerate(arrivals)
    ]


def group_config(scheduler_flags: tuple[str, ...]):
    """The GroupConfig the live scheduler builds from `--group-<field> value` flags (its
    `group_<field>` settings; tests/unit/bench/test_burst.py checks both agree)."""
    from services.policies import GroupConfig

    fields = {f.name: f for f in dataclasses.fields(GroupConfig)}
    values = {}
    flags = list(scheduler_flags)
    for flag, value in zip(flags[::2], flags[1::2], strict=True):
        name = flag.removeprefix("--group-").replace("-", "_")
        if not flag.startswith("--group-") or name not in fields:
            raise ValueError(f"{flag} is not a group knob of the scheduler")
        default = getattr(GroupConfig(), name)
        if not isinstance(default, int | float):
            raise ValueError(f"{flag}: only number knobs are read here")
        values[name] = type(default)(value)
    return GroupConfig(**values)


def sim_config(policy: str, scheduler_flags: tuple[str, ...], costs: dict, **engine) -> object:
    """The SimConfig of one policy's run: the group knobs the bench gives the live
    scheduler, its migration defaults (MigrationConfig's), the workers' engine knobs,
    the measured mesh costs."""
    from services.policies import MigrationConfig
    from services.simulator.config import SimConfig

    return SimConfig(
        num_instances=engine["num_instances"],
        block_size=engine["block_size"],
        max_num_seqs=engine["max_num_seqs"],
        max_num_batched_tokens=engine["max_num_batched_tokens"],
        max_model_len=engine["max_model_len"],
        policy=policy,
        group_config=group_config(scheduler_flags),
        migration_config=MigrationConfig(),
        migration_bandwidth_bytes_per_s=LINK_BYTES_PER_S,
        # Workers admit between steps (services/worker/async_engine.py) ...
        live_admission=True,
        # ... and report the load their last step left, plus what arrived since
        # (services/worker/llumlet.py).
        load_at_step_end=True,
        # The live drop: PrepareJoin, then JoinGroup, each at a member's step boundary.
        group_two_phase_join=True,
        **costs,
    )


def engine_knobs(profile, num_instances: int, block_size: int, max_num_seqs: int) -> dict:
    """The workers' engine knobs (their EngineConfig defaults where the bench sets none)."""
    from services.simulator.profiles import get_profile
    from services.worker.engine.config import EngineConfig

    worker = EngineConfig()
    pool = get_profile(profile, block_size=block_size)
    return {
        "num_instances": num_instances,
        "block_size": block_size,
        "max_num_seqs": max_num_seqs,
        "max_num_batched_tokens": worker.max_num_batched_tokens,
        # The worker allows the model's 4,096 tokens; the simulator wants a limit its pool
        # can hold. No request of the burst comes near either.
        "max_model_len": min(pool.max_model_len, pool.num_kv_blocks * block_size),
        "num_kv_blocks": pool.num_kv_blocks,
    }


def simulate(
    policy: str, sim: dict, arrivals, background_jobs: float = 0.0, cost_scale: float | None = None
) -> dict:
    """Figures of one policy's simulated run (the keys of the measured ones), with
    `background_jobs` runnable threads of other processes sharing the host's cores and
    every step costing `cost_scale` times the calibrated profile (the CPU / model that
    run's steps measured: bench/_burst_steps.cost_scale; None = 1)."""
    from services.simulator.cluster import Simulator
    from services.simulator.profiles import get_profile
    from services.worker.engine.cost_model import FEATURE_NAMES, CostModelProfile

    profile = CostModelProfile.from_dict(sim["profile"])
    if cost_scale is not None:
        profile = dataclasses.replace(
            profile, **{name: getattr(profile, name) * cost_scale for name in FEATURE_NAMES}
        )
    knobs = dict(sim["engine"])
    num_kv_blocks = knobs.pop("num_kv_blocks")
    costs = dict(sim["costs"])
    if costs["host_cores"]:
        costs["host_background_jobs"] = background_jobs
    config = sim_config(policy, tuple(sim["scheduler_flags"]), costs, **knobs)
    sim_profile = get_profile(profile, block_size=config.block_size)
    if sim_profile.num_kv_blocks != num_kv_blocks:
        raise RuntimeError(
            f"the simulated pool is {sim_profile.num_kv_blocks} blocks, the workers' "
            f"{num_kv_blocks}: the memory accounting differs"
        )
    result = Simulator(config, sim_requests(arrivals), sim_profile).run()
    ttfts = [r.first_token_s - r.arrival_s for r in result.records]
    return {
        "p50_ttft_s": round(percentile(ttfts, 50), 4),
        "p99_ttft_s": round(percentile(ttfts, 99), 4),
        "drops": result.groups.num_drops,
        "restores": result.groups.num_restores,
        "migrations": result.migration.num_committed,
        "preemptions": sum(r.num_preemptions for r in result.records),
        "makespan_s": round(result.makespan_s, 1),
        "background_jobs": round(config.host_background_jobs, 2),
        "cost_scale": cost_scale,
        # Seconds after the run's start (its first arrival is at 0) each group served.
        "drop_times_s": [round(t, 2) for t in result.groups.drop_times_s],
        "decided_times_s": [round(t, 2) for t in result.groups.decided_times_s],
        "ttfts_s": [
            round(t, 3)
            for _, t in sorted(
                (int(r.request_id), t) for r, t in zip(result.records, ttfts, strict=True)
            )
        ],
        "slowest_ttft": slowest(
            {int(r.request_id): t for r, t in zip(result.records, ttfts, strict=True)}
        ),
    }


def slowest(ttft_by_request: dict[int, float], count: int = 3) -> list[list]:
    """The `count` largest TTFTs as [request index, seconds], slowest first: with 48
    requests P99 is about the slowest one, so these name the requests fidelity is about."""
    ranked = sorted(ttft_by_request.items(), key=lambda kv: (-kv[1], kv[0]))[:count]
    return [[k, round(t, 3)] for k, t in ranked]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (the bench's, for both sides)."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    k = max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def sim_block(profile, fit_error: float, costs: dict, engine: dict, scheduler_flags) -> dict:
    """The JSON-able record of what the simulator is given."""
    return {
        "profile": profile.to_dict(),
        "profile_fit_error": round(fit_error, 4),
        "costs": costs,
        "engine": engine,
        "scheduler_flags": list(scheduler_flags),
        "link_bytes_per_s": LINK_BYTES_PER_S,
    }
