"""`llmesh drop --workers A,B[,C,D]`: KunServe parameter dropping by hand.

The scheduler plans the group (stage order = the order given; each stage keeps a
contiguous share of the layers), its stage 0 drops the layers every other member also
holds and turns the freed memory into KV blocks; the command returns once the group's
capacity is usable and prints the group. `llmesh restore --group G` undoes it.
"""

from __future__ import annotations

import json
import sys

import grpc

from protos import scheduler_pb2, scheduler_pb2_grpc
from services.cli.group_view import describe_group, group_to_json
from services.cli.status import default_addresses
from services.common.convert_groups import group_from_proto
from services.common.grpc_client import cluster_channel

HELP = "KunServe: instances drop the layers they share and serve as one pipeline"


def add_arguments(parser) -> None:
    parser.add_argument(
        "--workers",
        required=True,
        help="instance ids, comma-separated, in stage order (2 or more; stage 0 schedules)",
    )
    parser.add_argument(
        "--scheduler", help="scheduler host:port (default LLMESH_SCHEDULER_ADDRESS)"
    )
    parser.add_argument(
        "--timeout", type=float, default=180.0, help="seconds to wait for the group to serve"
    )
    parser.add_argument("--json", action="store_true", help="print the group as JSON")


def parse_workers(text: str) -> list[str]:
    """The ids of --workers; raises ValueError naming the flag."""
    instance_ids = [part.strip() for part in text.split(",")]
    if len(instance_ids) < 2 or not all(instance_ids):
        raise ValueError(
            f"--workers needs 2 or more instance ids separated by commas, got {text!r}"
        )
    for instance_id in instance_ids:
        if instance_ids.count(instance_id) > 1:
            raise ValueError(f"--workers lists {instance_id!r} twice")
    return instance_ids


def run(args) -> int:
    try:
        instance_ids = parse_workers(args.workers)
    except ValueError as exc:
        print(f"llmesh drop: {exc}", file=sys.stderr)
        return 2
    scheduler = args.scheduler or default_addresses().scheduler_address
    with cluster_channel(scheduler) as channel:
        try:
            reply = scheduler_pb2_grpc.SchedulerStub(channel).DropGroup(
                scheduler_pb2.DropGroupRequest(instance_ids=instance_ids), timeout=args.timeout
            )
        except grpc.RpcError as exc:
            print(f"llmesh drop: {exc.code().name}: {exc.details()}", file=sys.stderr)
            bad_input = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
            return 2 if exc.code() in bad_input else 1
    group = group_from_proto(reply.group)
    if args.json:
        print(json.dumps({"group": group_to_json(group), "drop_ms": round(reply.drop_ms, 3)}))
        return 0
    lines = describe_group(group)
    lines[0] += f", dropped in {reply.drop_ms:.1f} ms"
    print("\n".join(lines))
    return 0
