"""`llmesh-worker` / `python -m services.worker`: run one worker (engine + llumlet)."""

from __future__ import annotations

import argparse
import asyncio
import sys

from services.common.config import load_config
from services.common.logging import setup_logging
from services.common.procs import die_with_parent
from services.common.tracing import setup_tracing, shutdown_tracing


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="llmesh-worker",
        description="llmesh worker (one engine). Every flag also reads LLMESH_WORKER_<FLAG>.",
    )
    parser.add_argument("--bind", help="host:port of the Worker API (port 0 = any free port)")
    parser.add_argument(
        "--advertise-address", dest="advertise_address", help="address peers reach it at"
    )
    parser.add_argument("--scheduler", dest="scheduler_address", help="scheduler host:port")
    parser.add_argument("--instance-id", dest="instance_id", help="stable instance id")
    parser.add_argument("--model", help="'tiny' (embedded) or a checkpoint directory")
    parser.add_argument("--dtype")
    parser.add_argument("--device")
    parser.add_argument("--block-size", dest="block_size", type=int)
    parser.add_argument("--memory-capacity-mb", dest="memory_capacity_mb", type=int)
    parser.add_argument("--num-kv-blocks", dest="num_kv_blocks", type=int)
    parser.add_argument("--max-num-seqs", dest="max_num_seqs", type=int)
    parser.add_argument("--max-num-batched-tokens", dest="max_num_batched_tokens", type=int)
    parser.add_argument("--max-model-len", dest="max_model_len", type=int)
    parser.add_argument("--torch-threads", dest="torch_threads", type=int)
    parser.add_argument(
        "--gil-switch-interval-us",
        dest="gil_switch_interval_us",
        type=int,
        help="GIL switch interval of the worker process (default 500; Python's is 5000)",
    )
    parser.add_argument("--log-level", dest="log_level")
    parser.add_argument("--otlp-endpoint", dest="otlp_endpoint")
    parser.add_argument("--transport-backend", dest="transport_backend", choices=["ucx", "tcp"])
    parser.add_argument("--migration-selection", dest="migration_selection")
    parser.add_argument("--migration-lease-ms", dest="migration_lease_ms", type=int)
    parser.add_argument(
        "--migration-transfer-timeout-s", dest="migration_transfer_timeout_s", type=float
    )
    parser.add_argument(
        "--migration-stage-chunk-mib",
        dest="migration_stage_chunk_mib",
        type=float,
        help="largest KV transfer of a migration stage, MiB (default 16)",
    )
    parser.add_argument("--migration-fault", dest="migration_fault", help="tests only")
    parser.add_argument(
        "--migration-fault-pause-s", dest="migration_fault_pause_s", type=float, help="tests only"
    )
    parser.add_argument(
        "--ready-file", dest="ready_file", help="write the bound address here once serving"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    die_with_parent()
    args = parse_args(argv)
    from services.worker.config import WorkerConfig

    try:
        config = load_config(WorkerConfig, "WORKER", vars(args))
    except ValueError as exc:
        print(f"llmesh-worker: {exc}", file=sys.stderr)
        return 2
    setup_logging("worker", config.log_level)
    setup_tracing("llmesh-worker", config.otlp_endpoint or None)
    from services.worker.server import serve

    try:
        asyncio.run(serve(config))
    finally:
        shutdown_tracing()
    return 0


if __name__ == "__main__":
    sys.exit(main())
