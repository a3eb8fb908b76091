"""`llmesh status`: the cluster as the global scheduler sees it, as a table (or JSON).

Each instance shows the layers it holds and, in a KunServe group, the group and its
stage; the groups follow in a table of their own (services/cli/group_view.py).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass

import grpc

from protos import scheduler_pb2, scheduler_pb2_grpc
from services.cli.group_view import group_to_json, render_groups
from services.common.config import load_config
from services.common.convert import instance_spec_from_proto, load_from_proto
from services.common.convert_groups import group_from_proto
from services.common.groups import GroupSpec
from services.common.grpc_client import cluster_channel
from services.common.messages import InstanceSpec, LoadReport
from services.policies import InstanceLoad

HELP = "show the instances the scheduler knows (running, waiting, KV usage, freeness)"
TIMEOUT_S = 3.0


@dataclass(frozen=True)
class ClientAddresses:
    """Where the CLI finds the mesh: LLMESH_GATEWAY_ADDRESS / LLMESH_SCHEDULER_ADDRESS,
    and how it talks to the gateway: LLMESH_API_KEY, LLMESH_GATEWAY_CA."""

    gateway_address: str = "127.0.0.1:50051"  # the gateway's client API
    scheduler_address: str = "127.0.0.1:50052"  # the global scheduler
    api_key: str = ""  # LLMESH_API_KEY: the gateway's client API key (when it wants one)
    gateway_ca: str = ""  # LLMESH_GATEWAY_CA: PEM CA of a TLS gateway ("" = plaintext)


def default_addresses() -> ClientAddresses:
    return load_config(ClientAddresses, "")


@dataclass(frozen=True)
class InstanceRow:
    spec: InstanceSpec
    load: InstanceLoad
    ms_since_report: int
    layer_start: int = 0  # layers held now (a group member holds its stage's only)
    layer_end: int = 0
    freed_weight_bytes: int = 0

    @classmethod
    def from_proto(cls, state: scheduler_pb2.InstanceState) -> InstanceRow:
        spec = instance_spec_from_proto(state.info)
        report: LoadReport = load_from_proto(state.load, spec.block_size)
        # A worker that does not report its layers holds what it registered with.
        layers = (
            (report.layer_start, report.layer_end)
            if report.layer_end
            else (spec.layer_start, spec.layer_end)
        )
        return cls(spec, report.load, state.ms_since_report, *layers, report.freed_weight_bytes)

    def group_text(self) -> str:
        """`group-0/1`: the group and the stage, or "-" when the instance serves alone."""
        load = self.load
        return f"{load.group_id}/{load.group_stage}" if load.group_id else "-"


@dataclass(frozen=True)
class ClusterSummary:
    """The scheduler's policies and its control loops' counters."""

    dispatch_policy: str
    migration_policy: str
    num_migrations_ordered: int
    autoscale: bool
    pending_instance_ids: tuple[str, ...]
    draining_instance_ids: tuple[str, ...]
    num_instances_started: int
    num_instances_stopped: int
    groups: tuple[GroupSpec, ...] = ()
    group_policy: str = "none"
    num_groups_dropped: int = 0
    num_groups_restored: int = 0
    num_group_operations_failed: int = 0

    @classmethod
    def from_proto(cls, state: scheduler_pb2.ClusterState) -> ClusterSummary:
        return cls(
            dispatch_policy=state.dispatch_policy,
            migration_policy=state.migration_policy or "none",
            num_migrations_ordered=state.num_migrations_ordered,
            autoscale=state.autoscale,
            pending_instance_ids=tuple(state.pending_instance_ids),
            draining_instance_ids=tuple(state.draining_instance_ids),
            num_instances_started=state.num_instances_started,
            num_instances_stopped=state.num_instances_stopped,
            groups=tuple(group_from_proto(g) for g in state.groups),
            group_policy=state.group_policy or "none",
            num_groups_dropped=state.num_groups_dropped,
            num_groups_restored=state.num_groups_restored,
            num_group_operations_failed=state.num_group_operations_failed,
        )

    def describe(self) -> str:
        text = (
            f"dispatch: {self.dispatch_policy}  migration: {self.migration_policy} "
            f"({self.num_migrations_ordered} ordered)"
        )
        if self.group_policy != "none":
            text += (
                f"  groups: {self.group_policy} ({self.num_groups_dropped} dropped, "
                f"{self.num_groups_restored} restored, {self.num_group_operations_failed} failed)"
            )
        if self.autoscale:
            text += (
                f"  autoscale: {len(self.pending_instance_ids)} starting, "
                f"{len(self.draining_instance_ids)} draining, "
                f"{self.num_instances_started} started / {self.num_instances_stopped} stopped"
            )
        return text


def fetch_cluster(
    scheduler_address: str, timeout_s: float = TIMEOUT_S
) -> tuple[list[InstanceRow], ClusterSummary]:
    """(instances, summary); raises grpc.RpcError if the scheduler does not answer."""
    with cluster_channel(scheduler_address) as channel:
        state = scheduler_pb2_grpc.SchedulerStub(channel).GetClusterState(
            scheduler_pb2.GetClusterStateRequest(), timeout=timeout_s
        )
    return [InstanceRow.from_proto(i) for i in state.instances], ClusterSummary.from_proto(state)


def rows_from_proto(state: scheduler_pb2.ClusterState) -> list[InstanceRow]:
    return [InstanceRow.from_proto(i) for i in state.instances]


def _freeness(value: float) -> str:
    return "-inf (draining)" if math.isinf(value) and value < 0 else f"{value:.1f}"


def render_table(rows: list[InstanceRow], title: str):
    """A rich Table of the instances."""
    from rich import box
    from rich.table import Table

    table = Table(
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
        title=title,
        title_justify="left",
        caption=(
            "KV used = blocks used/total; queued = blocks waiting requests need; "
            "layers = held now; group = KunServe group/stage; age = since last report"
        ),
        caption_justify="left",
    )
    for column in (
        "instance",
        "address",
        "run",
        "wait",
        "KV used",
        "freeness",
        "queued",
        "layers",
        "group",
        "age",
    ):
        is_id = column in ("instance", "address")
        # Ids fold onto a second line rather than lose characters: users copy them.
        table.add_column(
            column,
            justify="left" if is_id else "right",
            no_wrap=not is_id,
            overflow="fold" if is_id else "ellipsis",
        )
    for row in rows:
        load = row.load
        usage = load.num_used_blocks / load.num_total_blocks if load.num_total_blocks else 0.0
        table.add_row(
            row.spec.instance_id,
            row.spec.address,
            str(load.num_running),
            str(load.num_waiting),
            f"{load.num_used_blocks}/{load.num_total_blocks} {usage:.0%}",
            _freeness(load.freeness),
            str(load.num_waiting_blocks),
            f"[{row.layer_start},{row.layer_end})",
            row.group_text(),
            f"{row.ms_since_report}ms",
        )
    if not rows:
        table.add_row("(none registered)", *[""] * 9)
    return table


def rows_to_json(rows: list[InstanceRow], summary: ClusterSummary) -> dict:
    return {
        "dispatch_policy": summary.dispatch_policy,
        "migration_policy": summary.migration_policy,
        "num_migrations_ordered": summary.num_migrations_ordered,
        "group_policy": summary.group_policy,
        "num_groups_dropped": summary.num_groups_dropped,
        "num_groups_restored": summary.num_groups_restored,
        "num_group_operations_failed": summary.num_group_operations_failed,
        "autoscale": summary.autoscale,
        "pending_instance_ids": list(summary.pending_instance_ids),
        "draining_instance_ids": list(summary.draining_instance_ids),
        "num_instances_started": summary.num_instances_started,
        "num_instances_stopped": summary.num_instances_stopped,
        "instances": [
            {
                "instance_id": r.spec.instance_id,
                "address": r.spec.address,
                "model_id": r.spec.model_id,
                "num_running": r.load.num_running,
                "num_waiting": r.load.num_waiting,
                "num_used_blocks": r.load.num_used_blocks,
                "num_total_blocks": r.load.num_total_blocks,
                "num_waiting_blocks": r.load.num_waiting_blocks,
                "freeness": r.load.freeness if math.isfinite(r.load.freeness) else None,
                "is_terminating": r.load.is_terminating,
                "num_preemptions": r.load.num_preemptions,
                "ms_since_report": r.ms_since_report,
                "layer_start": r.layer_start,
                "layer_end": r.layer_end,
                "group_id": r.load.group_id,
                "group_stage": r.load.group_stage,
                "freed_weight_bytes": r.freed_weight_bytes,
            }
            for r in rows
        ],
        "groups": [group_to_json(g) for g in summary.groups],
    }


def add_arguments(parser) -> None:
    parser.add_argument(
        "--scheduler",
        help="scheduler host:port (default: $LLMESH_SCHEDULER_ADDRESS or 127.0.0.1:50052)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args) -> int:
    address = args.scheduler or default_addresses().scheduler_address
    try:
        rows, summary = fetch_cluster(address)
    except grpc.RpcError as exc:
        print(
            f"llmesh status: the scheduler at {address} does not answer ({exc.code().name}); is the mesh up?",
            file=sys.stderr,
        )
        return 1
    if args.json:
        print(json.dumps(rows_to_json(rows, summary)))
        return 0
    from rich.console import Console

    console = Console()
    if not console.is_terminal:  # piped or logged: do not cut ids to an 80-column default
        console = Console(width=200)
    console.print(render_table(rows, f"llmesh cluster (scheduler {address})  {summary.describe()}"))
    if summary.groups:
        console.print(render_groups(list(summary.groups)))
    return 0
