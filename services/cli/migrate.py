"""`llmesh migrate --from A --to B [--request ID]`: move running requests by hand.

Looks both instances up in the scheduler, then asks the source worker to migrate
(MigrateOut, waiting for the outcome) and prints each migration's result.
"""

from __future__ import annotations

import json
import sys

import grpc

from protos import worker_pb2, worker_pb2_grpc
from services.cli.status import default_addresses, fetch_cluster
from services.common.convert import migration_mode_to_proto, migration_status_from_proto
from services.common.grpc_client import cluster_channel
from services.common.migration import MigrationMode

HELP = "live-migrate running requests from one instance to another"


def add_arguments(parser) -> None:
    parser.add_argument("--from", dest="src", required=True, help="source instance id")
    parser.add_argument("--to", dest="dst", required=True, help="destination instance id")
    parser.add_argument("--request", dest="request_id", default="", help="a specific request id")
    parser.add_argument("--num", dest="num_requests", type=int, default=1, help="how many requests")
    parser.add_argument(
        "--mode",
        default=MigrationMode.LIVE.value,
        choices=[mode.value for mode in MigrationMode],
        help="how KV moves",
    )
    parser.add_argument(
        "--scheduler", help="scheduler host:port (default LLMESH_SCHEDULER_ADDRESS)"
    )
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="seconds to wait for the outcome"
    )
    parser.add_argument("--json", action="store_true", help="print results as JSON")


def run(args) -> int:
    scheduler = args.scheduler or default_addresses().scheduler_address
    try:
        rows, _ = fetch_cluster(scheduler)
    except grpc.RpcError as exc:
        print(
            f"llmesh migrate: scheduler {scheduler} unreachable: {exc.code().name}", file=sys.stderr
        )
        return 2
    by_id = {row.spec.instance_id: row.spec for row in rows}
    for name in (args.src, args.dst):
        if name not in by_id:
            print(f"llmesh migrate: no instance {name!r}; known: {sorted(by_id)}", file=sys.stderr)
            return 2
    src, dst = by_id[args.src], by_id[args.dst]
    with cluster_channel(src.address) as channel:
        try:
            reply = worker_pb2_grpc.WorkerStub(channel).MigrateOut(
                worker_pb2.MigrateOutRequest(
                    dst_instance_id=dst.instance_id,
                    dst_address=dst.address,
                    dst_transport_address=dst.transport_address,
                    request_id=args.request_id,
                    num_requests=args.num_requests,
                    wait=True,
                    mode=migration_mode_to_proto(MigrationMode(args.mode)),
                ),
                timeout=args.timeout,
            )
        except grpc.RpcError as exc:
            print(f"llmesh migrate: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    results = [
        {
            "migration_id": r.migration_id,
            "request_id": r.request_id,
            "status": migration_status_from_proto(r.status).value,
            "reason": r.reason,
            "num_stages": r.num_stages,
            "num_blocks": r.num_blocks,
            "downtime_ms": round(r.downtime_ms, 3),
        }
        for r in reply.results
    ]
    if args.json:
        print(json.dumps({"results": results}))
    elif not results:
        print(f"no running request on {src.instance_id} to migrate")
    for r in [] if args.json else results:
        line = f"{r['request_id']}: {r['status']} {src.instance_id} -> {dst.instance_id}"
        if r["status"] == "COMMITTED":
            line += f" ({r['num_stages']} stages, {r['num_blocks']} blocks, downtime {r['downtime_ms']} ms)"
        else:
            line += f" ({r['reason']})"
        print(line)
    return 0 if results and all(r["status"] == "COMMITTED" for r in results) else 1
