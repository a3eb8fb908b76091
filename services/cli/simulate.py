"""`llmesh simulate`: the discrete-event cluster simulator (docs/simulator.md).

llmesh simulate --policy llumnix --rate 20 --requests 10000 --json
llmesh simulate --trace requests.csv --policy load_balance
llmesh simulate --compare --json            # the full comparison report
llmesh simulate --burst --json              # KunServe's burst comparison of the presets
llmesh simulate --compare --only priority   # one part of the comparison
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

HELP = (
    "simulate a cluster under the Llumnix policies (or --compare all of them, or --burst the "
    "KunServe presets); last line is JSON"
)

POLICIES = ("round_robin", "load_balance", "llumnix", "llumnix_no_defrag")


def add_arguments(parser) -> None:
    parser.add_argument("--compare", action="store_true", help="run the full comparison report")
    parser.add_argument(
        "--burst",
        action="store_true",
        help="run the burst comparison: recompute, llumnix, kunserve, llmesh presets",
    )
    parser.add_argument(
        "--intensities",
        default=None,
        help="--burst: comma-separated burst intensities (burst rate / base rate)",
    )
    parser.add_argument(
        "--base-rate", type=float, default=None, help="--burst: req/s between bursts"
    )
    parser.add_argument(
        "--burst-s", type=float, default=None, help="--burst: seconds of each burst"
    )
    parser.add_argument(
        "--period-s", type=float, default=None, help="--burst: a burst every this long"
    )
    parser.add_argument(
        "--presets", default=None, help="--burst: comma-separated presets (default all four)"
    )
    parser.add_argument(
        "--vote-window-s",
        type=float,
        default=None,
        help="--burst: GroupConfig.vote_window_s of the kunserve and llmesh policies (0.5)",
    )
    parser.add_argument(
        "--micro-batching",
        choices=("lookahead", "simple"),
        default=None,
        help="--burst: how groups form micro-batches (lookahead; the group presets also "
        "run with the other formation at the heaviest intensity)",
    )
    parser.add_argument(
        "--burst-plot", default="out/simulate_burst.png", help="--burst: PNG path ('' for none)"
    )
    parser.add_argument(
        "--json", action="store_true", help="end with one JSON line (always the case; accepted)"
    )
    parser.add_argument("--instances", type=int, default=16, help="instances (default 16)")
    parser.add_argument("--requests", type=int, default=None, help="requests per run")
    parser.add_argument("--profile", default="llama-7b-a10", help="cost-model profile or JSON")
    parser.add_argument("--policy", choices=POLICIES, default="llumnix")
    parser.add_argument("--rate", type=float, default=20.0, help="mean request rate (req/s)")
    parser.add_argument("--rates", default=None, help="--compare: comma-separated rates")
    parser.add_argument(
        "--priority-rate", type=float, default=None, help="--compare: rate of the priority run"
    )
    parser.add_argument(
        "--priority-seeds",
        type=int,
        default=4,
        help="--compare: workload seeds of the priority run (its P99s pool their requests)",
    )
    parser.add_argument(
        "--priority-replicas",
        type=int,
        default=None,
        help="--compare: runs per seed and side of the priority run (each seed's P99s are "
        "their mean; default 3)",
    )
    parser.add_argument(
        "--priority-headroom",
        type=int,
        default=None,
        help="--compare: blocks of headroom per running high-priority request",
    )
    parser.add_argument(
        "--only",
        default=None,
        help="--compare: comma-separated parts to run (compare, priority, autoscale, fidelity)",
    )
    parser.add_argument("--arrival", choices=("poisson", "gamma"), default="gamma")
    parser.add_argument(
        "--cv", type=float, default=2.0, help="gamma gaps' coefficient of variation"
    )
    parser.add_argument("--prompt", default="zipf:1.5:16:4000", help="prompt length distribution")
    parser.add_argument("--output", default="zipf:1.5:16:4000", help="output length distribution")
    parser.add_argument("--trace", default=None, help="CSV trace to replay instead")
    parser.add_argument("--high-priority-fraction", type=float, default=0.0)
    parser.add_argument("--priority", action="store_true", help="priority scheduling + headroom")
    parser.add_argument("--autoscale", action="store_true", help="auto-scale from --instances")
    parser.add_argument("--max-instances", type=int, default=16, help="--autoscale upper bound")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="--compare: parallel processes")
    parser.add_argument(
        "--plot", default="out/simulate_compare.png", help="--compare: PNG path ('' for none)"
    )
    parser.add_argument(
        "--fidelity-real",
        default=None,
        help="--compare: JSON from `llmesh bench simulator_fidelity --out`: the real side, "
        "and the workload and mesh costs to simulate it with",
    )
    parser.add_argument(
        "--fidelity-profile",
        default="tiny-cpu",
        help="--compare: profile of the fidelity run (--fidelity-real's wins)",
    )


def run(args) -> int:
    try:
        if args.burst:
            return _run_burst(args)
        if args.compare:
            return _run_compare(args)
        return _run_single(args)
    except ValueError as exc:
        print(f"llmesh simulate: {exc}", file=sys.stderr)
        return 2


def _run_single(args) -> int:
    from services.policies import ScalingConfig
    from services.simulator.cluster import Simulator
    from services.simulator.compare import policy_config
    from services.simulator.config import SimConfig
    from services.simulator.profiles import get_profile
    from services.simulator.report import table
    from services.simulator.workload import WorkloadConfig, generate, load_trace, parse_length

    config = policy_config(args.policy, SimConfig(num_instances=args.instances))
    config = dataclasses.replace(config, profile=args.profile)
    if args.priority:
        config = dataclasses.replace(
            config,
            scheduling_policy="priority",
            load_model=dataclasses.replace(config.load_model, high_priority_headroom_blocks=64),
        )
    else:
        config = dataclasses.replace(config, use_priorities=False)
    if args.autoscale:
        scaling = ScalingConfig(
            min_instances=min(args.instances, args.max_instances), max_instances=args.max_instances
        )
        config = dataclasses.replace(config, scaling=scaling)
    profile = get_profile(args.profile)
    if args.trace:
        requests = load_trace(args.trace, max_total_tokens=profile.max_model_len)
    else:
        requests = generate(
            WorkloadConfig(
                num_requests=args.requests or 1000,
                rate=args.rate,
                arrival=args.arrival,
                cv=args.cv,
                prompt=parse_length(args.prompt),
                output=parse_length(args.output),
                high_priority_fraction=args.high_priority_fraction,
                max_total_tokens=profile.max_model_len,
                seed=args.seed,
            )
        )
    result = Simulator(config, requests, profile).run()
    summary = result.summary.to_dict()
    out = {
        "policy": args.policy,
        **summary,
        "makespan_s": round(result.makespan_s, 3),
        "instance_seconds": round(result.instance_seconds, 1),
        "max_migration_downtime_s": round(result.migration.max_downtime_s, 6),
        "wall_s": round(result.wall_s, 2),
        "cpu_s": round(result.cpu_s, 2),
    }
    if any(r.priority for r in result.records):
        out["high"] = result.summary_for(is_high_priority=True).to_dict()
        out["normal"] = result.summary_for(is_high_priority=False).to_dict()
    print(table(("metric", "value"), [(k, v) for k, v in summary.items()]))
    print(json.dumps(out))
    return 0


def _run_compare(args) -> int:
    from services.simulator.compare import CompareConfig, run_compare
    from services.simulator.report import compare_tables, plot_compare

    fields = {
        "num_instances": args.instances,
        "profile": args.profile,
        "arrival": args.arrival,
        "cv": args.cv,
        "prompt": args.prompt,
        "output": args.output,
        "seed": args.seed,
        "workers": args.workers,
        "fidelity_profile": args.fidelity_profile,
    }
    if args.requests:
        fields["num_requests"] = args.requests
    if args.rates:
        fields["rates"] = tuple(float(r) for r in args.rates.split(","))
    if args.priority_rate:
        fields["priority_rate"] = args.priority_rate
    fields["priority_seeds"] = args.priority_seeds
    if args.priority_replicas is not None:
        fields["priority_replicas"] = args.priority_replicas
    if args.priority_headroom is not None:
        fields["high_priority_headroom_blocks"] = args.priority_headroom
    if args.only:
        fields["parts"] = tuple(part.strip() for part in args.only.split(","))
    real = None
    if args.fidelity_real:
        measured = json.loads(Path(args.fidelity_real).read_text())
        real = {
            "mean_ttft_s": measured["real_mean_ttft_s"],
            "mean_tpot_s": measured["real_mean_tpot_s"],
            "note": f"real side from {args.fidelity_real}",
        }
        # The workload, profile and mesh costs the bench simulated, so both sides match.
        fields.update(measured.get("sim_config", {}))
    cfg = CompareConfig(**fields)
    print(f"running the comparison on {cfg.workers} process(es)...", flush=True)
    report = run_compare(cfg, lambda line: print(line, flush=True), real)
    print()
    print(compare_tables(report))
    print()
    if not args.plot:
        print("plot: skipped (--plot '')")
    elif not {"compare", "autoscale", "fidelity"} <= set(cfg.parts):
        print("plot: skipped (it needs the compare, autoscale and fidelity parts)")
    elif written := plot_compare(report, args.plot):
        print(f"plot: wrote {written}")
    else:
        print("plot: skipped, matplotlib is not installed (it comes with the bench extra)")
    print(json.dumps(report))
    return 0


def _run_burst(args) -> int:
    from services.simulator.burst import (
        BurstConfig,
        burst_tables,
        plot_burst,
        run_burst,
        with_group_knobs,
    )

    fields = {
        "num_instances": args.instances,
        "profile": args.profile,
        "cv": args.cv,
        "prompt": args.prompt,
        "output": args.output,
        "seed": args.seed,
        "workers": args.workers,
    }
    if args.requests:
        fields["num_requests"] = args.requests
    if args.intensities:
        fields["intensities"] = tuple(float(k) for k in args.intensities.split(","))
    for flag, name in (
        ("base_rate", "base_rate"),
        ("burst_s", "burst_s"),
        ("period_s", "period_s"),
    ):
        if getattr(args, flag) is not None:
            fields[name] = getattr(args, flag)
    if args.micro_batching:
        fields["micro_batching"] = args.micro_batching
    if args.presets:
        fields["policies"] = tuple(args.presets.split(","))
    cfg = BurstConfig(**fields)
    if args.vote_window_s is not None:
        cfg = with_group_knobs(cfg, vote_window_s=args.vote_window_s)
    print(
        f"running the burst comparison ({len(cfg.intensities)} intensities x "
        f"{len(cfg.policies)} policies, {cfg.num_requests} requests each) on "
        f"{cfg.workers} process(es)...",
        flush=True,
    )
    report = run_burst(cfg, lambda line: print(line, flush=True))
    print()
    print(burst_tables(report))
    print()
    if not args.burst_plot:
        print("plot: skipped (--burst-plot '')")
    elif written := plot_burst(report, args.burst_plot):
        print(f"plot: wrote {written}")
    else:
        print("plot: skipped, matplotlib is not installed (it comes with the bench extra)")
    print(json.dumps(report))
    return 0
