"""`llmesh drain INSTANCE [--undo]`: drain a worker by hand (e.g. before maintenance).

The scheduler marks it terminating: its virtual usage becomes infinite, so dispatch
sends it nothing new, it refuses incoming migrations, and the scheduler's migration
loop moves its running requests away. `--wait` blocks until it is empty; `--undo`
lifts the mark.
"""

from __future__ import annotations

import sys
import time

import grpc

from protos import scheduler_pb2, scheduler_pb2_grpc
from services.cli.status import default_addresses, fetch_cluster
from services.common.grpc_client import cluster_channel

HELP = "drain an instance (no new work, running requests migrate away), or --undo it"


def add_arguments(parser) -> None:
    parser.add_argument("instance_id", help="the instance to drain")
    parser.add_argument("--undo", action="store_true", help="stop draining it")
    parser.add_argument("--wait", action="store_true", help="wait until it runs nothing")
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="--wait: give up after this many seconds"
    )
    parser.add_argument(
        "--scheduler", help="scheduler host:port (default LLMESH_SCHEDULER_ADDRESS)"
    )


def run(args) -> int:
    scheduler = args.scheduler or default_addresses().scheduler_address
    with cluster_channel(scheduler) as channel:
        try:
            reply = scheduler_pb2_grpc.SchedulerStub(channel).Drain(
                scheduler_pb2.SchedulerDrainRequest(
                    instance_id=args.instance_id, is_terminating=not args.undo
                ),
                timeout=5.0,
            )
        except grpc.RpcError as exc:
            print(f"llmesh drain: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 2 if exc.code() is grpc.StatusCode.NOT_FOUND else 1
    if not reply.sent:
        print(
            f"llmesh drain: {args.instance_id} has no open load stream right now; try again",
            file=sys.stderr,
        )
        return 1
    verb = "no longer draining" if args.undo else "draining"
    print(f"{args.instance_id}: {verb}", flush=True)
    if args.undo or not args.wait:
        return 0
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        rows, _ = fetch_cluster(scheduler)
        row = next((r for r in rows if r.spec.instance_id == args.instance_id), None)
        if row is None:
            print(f"{args.instance_id}: gone", flush=True)
            return 0
        load = row.load
        if load.is_terminating and load.num_running == load.num_waiting == 0:
            print(f"{args.instance_id}: drained (nothing running or waiting)", flush=True)
            return 0
        print(
            f"{args.instance_id}: {load.num_running} running, {load.num_waiting} waiting",
            flush=True,
        )
        time.sleep(1.0)
    print(f"llmesh drain: {args.instance_id} still busy after {args.timeout:.0f}s", file=sys.stderr)
    return 1
