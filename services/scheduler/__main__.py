"""`llmesh-scheduler` / `python -m services.scheduler`: run the global scheduler."""

from __future__ import annotations

import argparse
import asyncio
import sys

from services.common.cluster_auth import add_cluster_auth_flags, configure
from services.common.config import ConfigError, flag_type, load_config
from services.common.logging import setup_logging
from services.common.procs import die_with_parent
from services.common.telemetry_config import add_telemetry_flags
from services.common.tracing import setup_tracing, shutdown_tracing
from services.scheduler.config import SchedulerConfig


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="llmesh-scheduler",
        description="llmesh global scheduler. Every flag also reads LLMESH_SCHEDULER_<FLAG>.",
    )
    parser.add_argument("--bind", help="host:port to listen on (port 0 = any free port)")
    parser.add_argument(
        "--lease-s", dest="lease_s", type=float, help="instance lease length, seconds"
    )
    parser.add_argument("--report-interval-s", dest="report_interval_s", type=float)
    parser.add_argument(
        "--policy",
        dest="policy",
        help="preset: recompute, llumnix (default), kunserve or llmesh; sets the dispatch, "
        "migration and group policies not given by their own flags",
    )
    parser.add_argument(
        "--dispatch-policy", dest="dispatch_policy", help="e.g. freest, round_robin"
    )
    parser.add_argument(
        "--group-timeout-s",
        dest="group_timeout_s",
        type=float,
        help="KunServe: deadline of a group's drop / restore call to its stage 0, seconds",
    )
    migration = parser.add_argument_group("migration loop")
    migration.add_argument(
        "--migration-policy",
        dest="migration_policy",
        help="pairing policy: freeness (default) or none (no migration loop)",
    )
    migration.add_argument("--migration-interval-s", dest="migration_interval_s", type=float)
    migration.add_argument(
        "--migration-src-freeness-below", dest="migration_src_freeness_below", type=float
    )
    migration.add_argument(
        "--migration-dst-freeness-above", dest="migration_dst_freeness_above", type=float
    )
    migration.add_argument(
        "--migration-max-per-instance", dest="migration_max_per_instance", type=int
    )
    migration.add_argument("--migration-hold-s", dest="migration_hold_s", type=float)
    groups = parser.add_argument_group("KunServe group loop")
    groups.add_argument(
        "--group-policy",
        dest="group_policy",
        help="when to drop and restore groups: kunserve, llmesh or none (no group loop)",
    )
    groups.add_argument("--group-interval-s", dest="group_interval_s", type=float)
    groups.add_argument(
        "--group-vote-demand-at-least", dest="group_vote_demand_at_least", type=float
    )
    groups.add_argument("--group-vote-window-s", dest="group_vote_window_s", type=float)
    groups.add_argument(
        "--group-sizes",
        dest="group_sizes",
        type=flag_type(tuple[int, ...], "group_sizes", "--group-sizes"),
        help="group sizes to choose from, e.g. 2,4",
    )
    groups.add_argument("--group-weight-share", dest="group_weight_share", type=float)
    groups.add_argument(
        "--group-restore-usage-at-most", dest="group_restore_usage_at_most", type=float
    )
    groups.add_argument("--group-restore-window-s", dest="group_restore_window_s", type=float)
    groups.add_argument("--group-hold-s", dest="group_hold_s", type=float)
    scaling = parser.add_argument_group("auto-scaling")
    scaling.add_argument(
        "--autoscale",
        dest="autoscale",
        action="store_const",
        const=True,
        help="start and drain workers to keep the average freeness in a band",
    )
    scaling.add_argument("--scaling-policy", dest="scaling_policy")
    scaling.add_argument("--scaling-interval-s", dest="scaling_interval_s", type=float)
    scaling.add_argument("--scale-up-freeness", dest="scale_up_freeness", type=float)
    scaling.add_argument("--scale-down-freeness", dest="scale_down_freeness", type=float)
    scaling.add_argument("--scaling-cooldown-s", dest="scaling_cooldown_s", type=float)
    scaling.add_argument("--min-instances", dest="min_instances", type=int)
    scaling.add_argument("--max-instances", dest="max_instances", type=int)
    scaling.add_argument("--provisioner", dest="provisioner", help="local (worker processes here)")
    scaling.add_argument("--worker-model", dest="worker_model", help="--model of started workers")
    scaling.add_argument(
        "--worker-args", dest="worker_args", help="extra flags of started workers (one string)"
    )
    scaling.add_argument("--worker-log-dir", dest="worker_log_dir")
    parser.add_argument("--log-level", dest="log_level")
    add_telemetry_flags(parser)
    add_cluster_auth_flags(parser)
    parser.add_argument(
        "--ready-file", dest="ready_file", help="write the bound address here once serving"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    die_with_parent()
    args = parse_args(argv)
    try:
        config = load_config(SchedulerConfig, "SCHEDULER", vars(args))
        configure(vars(args), role="scheduler")  # no cluster secret: refuse to start
    except ConfigError as exc:
        print(f"llmesh-scheduler: {exc}", file=sys.stderr)
        return 2
    setup_logging("scheduler", config.log_level)
    setup_tracing("llmesh-scheduler", config.telemetry)
    from services.scheduler.server import serve

    try:
        asyncio.run(serve(config))
    finally:
        shutdown_tracing()
    return 0


if __name__ == "__main__":
    sys.exit(main())
