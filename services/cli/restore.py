"""`llmesh restore --group G`: a KunServe group's members get their layers back.

The scheduler tells the group's stage 0, which reloads the dropped layers on every
member, moves each running request's KV home to one member and dissolves the group;
the command returns once every member serves alone again.
"""

from __future__ import annotations

import json
import sys

import grpc

from protos import scheduler_pb2, scheduler_pb2_grpc
from services.cli.status import default_addresses
from services.common.grpc_client import cluster_channel

HELP = "KunServe: restore a group's layers and dissolve it (see `llmesh status` for ids)"


def add_arguments(parser) -> None:
    parser.add_argument("--group", required=True, help="group id, e.g. group-0")
    parser.add_argument(
        "--scheduler", help="scheduler host:port (default LLMESH_SCHEDULER_ADDRESS)"
    )
    parser.add_argument(
        "--timeout", type=float, default=180.0, help="seconds to wait for the restore"
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")


def run(args) -> int:
    group_id = args.group.strip()
    if not group_id:
        print(
            "llmesh restore: --group must name a group (llmesh status lists them)", file=sys.stderr
        )
        return 2
    scheduler = args.scheduler or default_addresses().scheduler_address
    with cluster_channel(scheduler) as channel:
        try:
            reply = scheduler_pb2_grpc.SchedulerStub(channel).RestoreGroup(
                scheduler_pb2.RestoreGroupRequest(group_id=group_id), timeout=args.timeout
            )
        except grpc.RpcError as exc:
            print(f"llmesh restore: {exc.code().name}: {exc.details()}", file=sys.stderr)
            bad_input = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
            return 2 if exc.code() in bad_input else 1
    if args.json:
        print(
            json.dumps(
                {
                    "group_id": group_id,
                    "num_requests_moved": reply.num_requests_moved,
                    "num_preempted": reply.num_preempted,
                    "restore_ms": round(reply.restore_ms, 3),
                }
            )
        )
        return 0
    print(
        f"{group_id}: restored in {reply.restore_ms:.1f} ms; {reply.num_requests_moved} "
        f"requests moved to another member, {reply.num_preempted} preempted (recompute)"
    )
    return 0
