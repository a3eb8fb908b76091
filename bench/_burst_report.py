"""The summary's simulator side and its table: the simulator's figures for each measured
policy, fidelity (simulated / measured P99 TTFT) and the KunServe target, the printed
table, and `--resim` (a recorded run re-predicted without a mesh).

Apart from the mesh code so that `--resim` and the unit tests run none of it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench import _burst_sim
from bench._burst_steps import cost_scale
from bench._burst_workload import workload


def sim_figures(sim: dict, arrivals, measured: dict, progress) -> dict:
    """The simulator's figures for each measured policy (the summary's sim_* keys), each
    with the other processes that loaded the machine during that policy's run and the
    step costs its workers measured (the profile's shape, that run's level)."""
    figures = {}
    for policy, real in measured.items():
        background = real.get("effective_background_jobs")
        if background is None:  # a run recorded before the mesh's own threads were
            background = real.get("background_jobs") or 0.0
        scale = cost_scale(real.get("steps"))
        figures[policy] = _burst_sim.simulate(policy, sim, arrivals, background, scale)
        progress(f"{policy} (simulated): {figures[policy]}")
    return {
        "sim_p99_ttft_s": {p: f["p99_ttft_s"] for p, f in figures.items()},
        "sim_p50_ttft_s": {p: f["p50_ttft_s"] for p, f in figures.items()},
        "sim_drops": {p: f["drops"] for p, f in figures.items()},
        "sim_background_jobs": {p: f["background_jobs"] for p, f in figures.items()},
        "sim_cost_scale": {p: f["cost_scale"] for p, f in figures.items()},
        "sim_policies": figures,
    }


def add_ratios(summary: dict) -> None:
    """fidelity (simulated / measured P99 TTFT per policy) and the kunserve target."""
    measured = summary["policies"]
    summary["fidelity"] = {
        p: round(sim / measured[p]["p99_ttft_s"], 3) for p, sim in summary["sim_p99_ttft_s"].items()
    }
    summary["fidelity_within_25pct"] = all(
        abs(ratio - 1) <= 0.25 for ratio in summary["fidelity"].values()
    )
    if "recompute" in measured and "kunserve" in measured:
        speedup = measured["recompute"]["p99_ttft_s"] / measured["kunserve"]["p99_ttft_s"]
        summary["kunserve_p99_ttft_speedup_vs_recompute"] = round(speedup, 2)
        summary["kunserve_target_met"] = speedup >= 2 and measured["kunserve"]["drops"] >= 1


def resimulate(path: Path, policies, progress) -> int:
    """Re-predicts a recorded run (its JSON line) with this simulator; prints the table."""
    summary = json.loads(path.read_text().strip().splitlines()[-1])
    args = argparse.Namespace(**summary["workload_args"])
    measured = {p: f for p, f in summary["policies"].items() if p in policies}
    summary.update(sim_figures(summary["sim_config"], workload(args), measured, progress))
    add_ratios(summary)
    print_table(summary)
    print(json.dumps(summary))
    return 0


def print_table(summary: dict) -> None:
    print(f"{'policy':>10} {'p50 ttft s':>10} {'p99 ttft s':>10} {'sim p50':>8} {'sim p99':>8} "
          f"{'sim/real':>8} {'drops':>5} {'sim':>4} {'migr':>5} {'preempt':>7} "
          f"{'tokens exact':>12} {'bg threads':>10} {'step cost':>9}")  # fmt: skip
    for policy, f in summary["policies"].items():
        exact = summary["tokens_identical_per_policy"][policy]
        sim_p50 = summary["sim_p50_ttft_s"].get(policy, float("nan"))
        sim_p99 = summary["sim_p99_ttft_s"].get(policy, float("nan"))
        ratio = summary["fidelity"].get(policy, float("nan"))
        sim_drops = summary["sim_drops"].get(policy, "-")
        print(f"{policy:>10} {f['p50_ttft_s']:>10.3f} {f['p99_ttft_s']:>10.3f} {sim_p50:>8.3f} "
              f"{sim_p99:>8.3f} {ratio:>8.2f} {f['drops']:>5} {sim_drops!s:>4} "
              f"{f['migrations']:>5} {f['preemptions']:>7} {exact!s:>12} "
              f"{summary['sim_background_jobs'].get(policy, 0):>10.2f} "
              f"{summary.get('sim_cost_scale', {}).get(policy) or 1.0:>9.3f}")  # fmt: skip
    for policy, f in summary["policies"].items():
        sim = summary.get("sim_policies", {}).get(policy, {})
        print(f"{policy:>10} slowest [request, TTFT s]: real {f.get('slowest_ttft', '-')}, "
              f"sim {sim.get('slowest_ttft', '-')}; groups serving at (s): "
              f"real {f.get('drop_times_s', '-')}, sim {sim.get('drop_times_s', '-')}; "
              f"decided at (s): real {f.get('decided_times_s', '-')}, "
              f"sim {sim.get('decided_times_s', '-')}")  # fmt: skip
        for phase, st in f.get("steps", {}).items():
            print(f"{'':>10} {phase:>9} steps: {st['num_steps']:>4}, CPU / model "
                  f"{st['cpu_per_model']}, wall / CPU {st['wall_per_cpu']}, "
                  f"workers stepping {st['busy_workers']}")  # fmt: skip
    host = summary["host"]
    print(f"host: {host['cores']} cores, load average {host['load_avg_at_start']} at the start, "
          f"{host['load_avg_at_end']} at the end")  # fmt: skip
