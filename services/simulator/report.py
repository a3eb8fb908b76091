"""Readable tables (and an optional PNG) for simulation results."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = "  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(out)


def compare_tables(report: dict[str, Any]) -> str:
    """The comparison report as text (the parts it has)."""
    cfg = report["config"]
    parts = [
        f"{cfg['num_instances']} x {cfg['profile']}, "
        f"{cfg['num_requests']} requests per run, {cfg['arrival']} arrivals (CV {cfg['cv']}), "
        f"prompt {cfg['prompt']}, output {cfg['output']}, seed {cfg['seed']}",
    ]
    if "compare" in report:
        parts += [
            "",
            "Policy comparison:",
            table(
                (
                    "rate",
                    "policy",
                    "mean TTFT",
                    "P99 TTFT",
                    "mean TPOT",
                    "P99 TPOT",
                    "P99 E2E",
                    "preempt",
                    "preempt loss/req",
                    "migrations",
                ),
                [
                    (
                        f"{r['rate']:g}",
                        r["policy"],
                        r["mean_ttft_s"],
                        r["p99_ttft_s"],
                        r["mean_tpot_s"],
                        r["p99_tpot_s"],
                        r["p99_e2e_s"],
                        r["preemptions"],
                        r["preemption_loss_s"],
                        r["migrations"],
                    )
                    for r in report["compare"]
                ],
            ),
        ]
    if "priority" in report:
        parts += ["", *priority_tables(report["priority"])]
    if "autoscale" in report:
        a = report["autoscale"]
        parts += [
            "",
            "Auto-scaling (Llumnix, rising and falling load):",
            table(
                ("fleet", "instance-seconds", "P99 TTFT"),
                [
                    ("auto-scaled", a["instance_seconds"], a["p99_ttft_s"]),
                    ("fixed", a["instance_seconds_fixed"], a["p99_ttft_fixed_s"]),
                ],
            ),
        ]
    if "fidelity" in report:
        f = report["fidelity"]
        parts += [
            "",
            "Fidelity (4 tiny workers, calibrated profile):",
            table(
                ("side", "mean TTFT", "mean TPOT"),
                [
                    ("real mesh", f["real_mean_ttft_s"], f["real_mean_tpot_s"]),
                    ("simulator", f["sim_mean_ttft_s"], f["sim_mean_tpot_s"]),
                ],
            ),
        ]
        if f.get("sim_host_cores"):
            parts.append(
                f"  simulated with the mesh's measured costs: "
                f"{f['sim_dispatch_latency_s'] * 1e3:.2f} ms per request, "
                f"{f['sim_step_overhead_s'] * 1e3:.2f} ms per step, {f['sim_host_cores']:g} "
                f"shared cores, {f['sim_stream_cpu_per_token_s'] * 1e3:.2f} ms CPU per streamed token"
            )
        if f.get("note"):
            parts.append(f"  note: {f['note']}")
    if "wall_seconds_16x10k" in report:
        parts += [
            "",
            f"One {cfg['num_instances']} x {cfg['num_requests']} simulation: "
            f"{report['wall_seconds_16x10k']} s wall, {report['cpu_seconds_16x10k']} s CPU",
        ]
    return "\n".join(parts)


def priority_tables(p: dict[str, Any]) -> list[str]:
    """The priority run: pooled P99s, then each seed's cost to normal requests."""
    replicas = p["replicas"]
    return [
        f"Priorities (rate {p['rate']:g} req/s, Llumnix, {p['headroom_blocks']} blocks of "
        "headroom per running high-priority request):",
        f"P99 TTFT (s) over every request of workload seeds {p['seeds']}, {replicas} run(s) each",
        table(
            ("class", "with priority", "without priority"),
            [
                ("high", p["high_p99_ttft_s"], p["high_p99_ttft_no_priority_s"]),
                ("normal", p["normal_p99_ttft_s"], p["normal_p99_ttft_no_priority_s"]),
            ],
        ),
        "",
        f"Per seed (P99s in s: the mean of its {replicas} run(s)' P99s; without priorities, "
        "one run's normal P99 strays from that mean by up to '1-run spread'):",
        table(
            (
                "seed",
                "normal P99 TTFT",
                "without",
                "cost %",
                "1-run spread %",
                "high P99 TTFT",
                "without",
                "high P99 TPOT",
                "without",
            ),
            [
                (
                    row["seed"],
                    row["normal_p99_ttft_s"],
                    row["normal_p99_ttft_no_priority_s"],
                    f"{row['normal_p99_ttft_cost_pct']:+.1f}",
                    f"±{row['normal_p99_ttft_one_run_spread_pct']:.1f}",
                    row["high_p99_ttft_s"],
                    row["high_p99_ttft_no_priority_s"],
                    row["high_p99_tpot_s"],
                    row["high_p99_tpot_no_priority_s"],
                )
                for row in p["per_seed"]
            ],
        ),
        f"  cost to normal requests, worst seed: {p['max_normal_p99_ttft_cost_pct']:+.1f}%",
    ]


def plot_compare(report: dict[str, Any], path: str | Path) -> str | None:
    """Writes a PNG: P99 TTFT and preemption loss per rate and policy, the auto-scaler's
    fleet size over time, and the fidelity run's mean TTFT / TPOT (real mesh beside the
    simulator when measured). Returns the path, or None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = report["compare"]
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.2))
    for name in policies:
        mine = [r for r in rows if r["policy"] == name]
        rates = [r["rate"] for r in mine]
        axes[0].plot(rates, [r["p99_ttft_s"] for r in mine], marker="o", label=name)
        axes[1].plot(rates, [r["preemption_loss_s"] for r in mine], marker="o", label=name)
    axes[0].set(xlabel="request rate (req/s)", ylabel="P99 TTFT (s)", yscale="log")
    axes[0].set_title("policy comparison", fontsize=10)
    axes[1].set(xlabel="request rate (req/s)", ylabel="preemption loss per request (s)")
    axes[0].legend()
    autoscale = report["autoscale"]
    if autoscale["timeline"]:
        times, counts = zip(*autoscale["timeline"], strict=True)
        axes[2].step(times, counts, where="post")
    axes[2].set(xlabel="time (s)", ylabel="instances (auto-scaled)")
    axes[2].set_title(
        f"{autoscale['instance_seconds']:g} vs {autoscale['instance_seconds_fixed']:g} "
        "instance-s (fixed)",
        fontsize=10,
    )
    _plot_fidelity(axes[3], report["fidelity"])
    return save_figure(fig, path)


def save_figure(fig, path: str | Path) -> str:
    """Lay out `fig`, write it as a PNG at `path` (its folder made), close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def _plot_fidelity(ax, fidelity: dict[str, Any]) -> None:
    """Grouped bars in ms: mean TTFT and mean TPOT, simulator and (if measured) real mesh."""
    metrics = (("mean TTFT", "ttft"), ("mean TPOT", "tpot"))
    sides = [("simulator", "sim")]
    if fidelity.get("real_mean_ttft_s") is not None:
        sides.insert(0, ("real mesh", "real"))
    width = 0.8 / len(sides)
    for i, (label, side) in enumerate(sides):
        values = [fidelity[f"{side}_mean_{key}_s"] * 1e3 for _, key in metrics]
        xs = [m + (i - (len(sides) - 1) / 2) * width for m in range(len(metrics))]
        bars = ax.bar(xs, values, width, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(range(len(metrics)), [name for name, _ in metrics])
    ax.set(ylabel="ms")
    ax.set_title("fidelity: 4 tiny workers", fontsize=10)
    ax.legend()
