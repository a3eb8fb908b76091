"""`llmesh-worker` / `python -m services.worker`: run one worker (engine + llumlet)."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys

from services.common.cluster_auth import add_cluster_auth_flags, configure
from services.common.config import ConfigError, flag_type, load_config
from services.common.logging import setup_logging
from services.common.procs import die_with_parent
from services.common.telemetry_config import add_telemetry_flags
from services.common.tracing import setup_tracing, shutdown_tracing


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="llmesh-worker",
        description="llmesh worker (one engine). Every flag also reads LLMESH_WORKER_<FIELD>; "
        "engine flags LLMESH_WORKER_ENGINE_<FIELD>, migration flags "
        "LLMESH_WORKER_MIGRATION_<FIELD> (see services/worker/config.py). A flag takes what "
        "its variable takes: 'none' unsets an optional, sizes are bytes or 256MiB, 2GiB.",
    )
    parser.add_argument("--bind", help="host:port of the Worker API (port 0 = any free port)")
    parser.add_argument(
        "--advertise-address", dest="advertise_address", help="address peers reach it at"
    )
    parser.add_argument("--scheduler", dest="scheduler_address", help="scheduler host:port")
    parser.add_argument("--instance-id", dest="instance_id", help="stable instance id")
    parser.add_argument("--torch-threads", dest="torch_threads", type=int)
    parser.add_argument(
        "--gil-switch-interval-us",
        dest="gil_switch_interval_us",
        type=int,
        help="GIL switch interval of the worker process (default 500; Python's is 5000)",
    )
    parser.add_argument(
        "--max-waiting-requests",
        dest="max_waiting_requests",
        type=flag_type(int | None, "max_waiting_requests", "--max-waiting-requests"),
        help="Submit refuses (RESOURCE_EXHAUSTED) while this many wait (default 256; none)",
    )
    parser.add_argument("--log-level", dest="log_level")
    add_telemetry_flags(parser)
    add_cluster_auth_flags(parser)
    parser.add_argument("--transport-backend", dest="transport_backend", choices=["ucx", "tcp"])
    parser.add_argument(
        "--transport-bind", dest="transport_bind", help="TCP data plane host:port to listen on"
    )
    parser.add_argument(
        "--transport-advertise-address",
        dest="transport_advertise_address",
        help="TCP data plane host:port peers connect to (empty = the bound one)",
    )
    parser.add_argument(
        "--ready-file", dest="ready_file", help="write the bound address here once serving"
    )
    engine = parser.add_argument_group("engine (WorkerConfig.engine)")
    engine.add_argument(
        "--model", dest="engine.model", help="'tiny' (embedded) or a checkpoint directory"
    )
    engine.add_argument("--dtype", dest="engine.dtype")
    engine.add_argument("--device", dest="engine.device")
    engine.add_argument("--block-size", dest="engine.block_size", type=int)
    engine.add_argument(
        "--memory-capacity-bytes",
        dest="engine.memory_capacity_bytes",
        type=flag_type(int, "memory_capacity_bytes", "--memory-capacity-bytes"),
        help="weights + KV pool (default 256MiB)",
    )
    engine.add_argument(
        "--num-kv-blocks",
        dest="engine.num_kv_blocks",
        type=flag_type(int | None, "num_kv_blocks", "--num-kv-blocks"),
        help="KV pool size in blocks; none (default) = all that fits",
    )
    engine.add_argument("--max-num-seqs", dest="engine.max_num_seqs", type=int)
    engine.add_argument("--max-num-batched-tokens", dest="engine.max_num_batched_tokens", type=int)
    engine.add_argument(
        "--max-model-len",
        dest="engine.max_model_len",
        type=flag_type(int | None, "max_model_len", "--max-model-len"),
        help="context limit; none (default) = the model's",
    )
    engine.add_argument(
        "--scheduling-policy",
        dest="engine.scheduling_policy",
        help="engine batch order: fcfs (default) or priority",
    )
    engine.add_argument(
        "--kernels",
        dest="engine.kernels",
        help="kernel backend: auto (default), native or torch; also $LLMESH_KERNELS",
    )
    migration = parser.add_argument_group("live migration (WorkerConfig.migration)")
    migration.add_argument("--migration-selection", dest="migration.selection")
    migration.add_argument("--migration-lease-s", dest="migration.lease_s", type=float)
    migration.add_argument(
        "--migration-transfer-timeout-s", dest="migration.transfer_timeout_s", type=float
    )
    migration.add_argument(
        "--migration-stage-chunk-bytes",
        dest="migration.stage_chunk_bytes",
        type=flag_type(int, "stage_chunk_bytes", "--migration-stage-chunk-bytes"),
        help="largest KV transfer of a migration stage (default 16MiB)",
    )
    kunserve = parser.add_argument_group("KunServe groups (WorkerConfig.kunserve)")
    kunserve.add_argument(
        "--kunserve-max-in-flight",
        dest="kunserve.max_in_flight",
        type=int,
        help="micro-batches stage 0 keeps in flight; 0 = one per stage (default)",
    )
    kunserve.add_argument(
        "--kunserve-transfer-timeout-s", dest="kunserve.transfer_timeout_s", type=float
    )
    kunserve.add_argument(
        "--kunserve-micro-batching",
        dest="kunserve.micro_batching",
        help="lookahead (cost-balanced micro-batches, default) or simple",
    )
    return parser.parse_args(argv)


def _fault_hooks():
    """(migration, KunServe) fault hooks: none, unless $LLMESH_TEST_HOOKS names a test
    module (defining `migration_faults` and/or `kunserve_faults`)."""
    from services.worker.config import TestHooksConfig
    from services.worker.kunserve.faults import NO_GROUP_FAULTS
    from services.worker.migration.faults import NO_FAULTS

    module_name = load_config(TestHooksConfig, "TEST").hooks
    if not module_name:
        return NO_FAULTS, NO_GROUP_FAULTS
    module = importlib.import_module(module_name)
    return (
        getattr(module, "migration_faults", NO_FAULTS),
        getattr(module, "kunserve_faults", NO_GROUP_FAULTS),
    )


def main(argv: list[str] | None = None) -> int:
    die_with_parent()
    args = parse_args(argv)
    from services.worker.config import WorkerConfig

    try:
        config = load_config(WorkerConfig, "WORKER", vars(args))
        configure(vars(args), role="worker")  # no cluster secret: refuse to start
    except ConfigError as exc:
        print(f"llmesh-worker: {exc}", file=sys.stderr)
        return 2
    setup_logging("worker", config.log_level)
    setup_tracing("llmesh-worker", config.telemetry, instance_id=config.instance_id)
    from services.worker.server import serve

    try:
        faults, group_faults = _fault_hooks()
        asyncio.run(serve(config, faults=faults, group_faults=group_faults))
    finally:
        shutdown_tracing()
    return 0


if __name__ == "__main__":
    sys.exit(main())
