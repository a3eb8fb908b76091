"""`llmesh-scheduler` / `python -m services.scheduler`: run the global scheduler."""

from __future__ import annotations

import argparse
import asyncio
import sys

from services.common.config import ConfigError, load_config
from services.common.logging import setup_logging
from services.common.tracing import setup_tracing, shutdown_tracing
from services.scheduler.config import SchedulerConfig


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="llmesh-scheduler",
        description="llmesh global scheduler. Every flag also reads LLMESH_SCHEDULER_<FLAG>.",
    )
    parser.add_argument("--bind", help="host:port to listen on (port 0 = any free port)")
    parser.add_argument("--lease-ms", dest="lease_ms", type=int, help="instance lease length")
    parser.add_argument("--report-interval-ms", dest="report_interval_ms", type=int)
    parser.add_argument(
        "--dispatch-policy", dest="dispatch_policy", help="e.g. freest, round_robin"
    )
    parser.add_argument("--log-level", dest="log_level")
    parser.add_argument("--otlp-endpoint", dest="otlp_endpoint")
    parser.add_argument(
        "--ready-file", dest="ready_file", help="write the bound address here once serving"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(SchedulerConfig, "SCHEDULER", vars(args))
    except ConfigError as exc:
        print(f"llmesh-scheduler: {exc}", file=sys.stderr)
        return 2
    setup_logging("scheduler", config.log_level)
    setup_tracing("llmesh-scheduler", config.otlp_endpoint or None)
    from services.scheduler.server import serve

    try:
        asyncio.run(serve(config))
    finally:
        shutdown_tracing()
    return 0


if __name__ == "__main__":
    sys.exit(main())
