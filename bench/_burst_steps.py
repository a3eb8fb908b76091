"""The live workers' engine steps during one policy's `bench burst` run, set against the
simulator's cost model: where a measured step's time goes.

Each worker logs every engine step (`engine_step`, WorkerConfig.step_log): its start,
wall time, the engine thread's CPU time and the batch's cost-model features. Per run:

    model_s   what the calibrated profile says the steps cost (CPU seconds of one core)
    cpu_s     what the engine threads spent on them (thread CPU time)
    wall_s    how long they took
    cpu / model   > 1: a step costs more CPU in the mesh than in the calibration
    wall / cpu    the share of a core a stepping thread got (processor sharing)
    busy          time-weighted mean of the workers stepping at once while one steps

Apart from the mesh code: it only reads logs, so tests run it on hand-written lines.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Step:
    worker: int
    start_s: float  # after the run's start
    wall_s: float
    cpu_s: float
    features: tuple[float, ...]


def read_steps(log_paths: list[Path], started_at: float) -> list[Step]:
    """Every `engine_step` line of the workers' logs, in start order."""
    steps = []
    for worker, path in enumerate(log_paths):
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            if '"engine_step"' not in line:
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            steps.append(
                Step(
                    worker,
                    event["start_ns"] / 1e9 - started_at,
                    event["wall_ms"] / 1e3,
                    event["cpu_ms"] / 1e3,
                    tuple(float(f) for f in event["features"]),
                )
            )
    return sorted(steps, key=lambda s: (s.start_s, s.worker))


def modelled_s(coefficients: tuple[float, ...], step: Step) -> float:
    return sum(c * f for c, f in zip(coefficients, step.features, strict=True))


def busy_workers(steps: list[Step]) -> list[float]:
    """For each step, the time-weighted mean number of workers stepping during it (itself
    included): processor sharing's k."""
    edges = sorted([(s.start_s, 1) for s in steps] + [(s.start_s + s.wall_s, -1) for s in steps])
    # Piecewise-constant count of steps running, then its mean over each step.
    times, counts, running = [], [], 0
    for t, delta in edges:
        running += delta
        times.append(t)
        counts.append(running)
    means = []
    for s in steps:
        end = s.start_s + s.wall_s
        if s.wall_s <= 0:
            means.append(1.0)
            continue
        k = bisect.bisect_right(times, s.start_s) - 1
        area, t = 0.0, s.start_s
        while k + 1 < len(times) and times[k + 1] < end:
            area += counts[k] * (times[k + 1] - t)
            t = times[k + 1]
            k += 1
        area += counts[k] * (end - t)
        means.append(max(1.0, area / s.wall_s))
    return means


def step_windows(args) -> list[tuple[str, float, float]]:
    """The run's phases: residents alone, the burst (to a second after it), the rest."""
    burst_end = args.burst_at_s + args.burst_s + 1.0
    return [
        ("residents", 0.0, args.burst_at_s),
        ("burst", args.burst_at_s, burst_end),
        ("after", burst_end, float("inf")),
    ]


def summarise(steps: list[Step], coefficients: tuple[float, ...], windows) -> dict:
    """Totals and ratios over each (name, start_s, end_s) window of the run."""
    busy = busy_workers(steps)
    out = {}
    for name, start, end in windows:
        chosen = [(s, b) for s, b in zip(steps, busy, strict=True) if start <= s.start_s < end]
        if not chosen:
            continue
        model = sum(modelled_s(coefficients, s) for s, _ in chosen)
        cpu = sum(s.cpu_s for s, _ in chosen)
        wall = sum(s.wall_s for s, _ in chosen)
        out[name] = {
            "num_steps": len(chosen),
            "model_s": round(model, 3),
            "cpu_s": round(cpu, 3),
            "wall_s": round(wall, 3),
            "cpu_per_model": round(cpu / model, 3) if model else None,
            "wall_per_cpu": round(wall / cpu, 3) if cpu else None,
            "busy_workers": round(sum(b * s.wall_s for s, b in chosen) / wall, 2) if wall else None,
        }
    return out


# The phases whose steps set the TTFTs: every request's first token comes in them or
# waits on their steps (the rest of the run is decodes and group micro-batches).
SCALE_PHASES = ("residents", "burst")


def cost_scale(summary: dict | None) -> float | None:
    """The CPU the run's steps took over what the calibrated profile says (CPU / model)
    across SCALE_PHASES: how much dearer a step was in that mesh than in the calibration
    (SimConfig's profile is scaled by it). None without logged steps."""
    phases = [summary[p] for p in SCALE_PHASES if summary and summary.get(p)]
    model = sum(p["model_s"] for p in phases)
    if not model:
        return None
    return round(sum(p["cpu_s"] for p in phases) / model, 3)


def join_cpu_s(log_paths: list[Path]) -> list[float]:
    """Engine-thread CPU seconds of every member's join (`group_joined`'s join_cpu_ms):
    what a drop costs a member once it is between steps (SimConfig.group_join_s)."""
    out = []
    for path in log_paths:
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            if '"group_joined"' not in line:
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "join_cpu_ms" in event:
                out.append(event["join_cpu_ms"] / 1e3)
    return out
