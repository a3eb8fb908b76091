"""`llmesh status`: the rows it builds from the scheduler's ClusterState."""

from __future__ import annotations

from protos import common_pb2, scheduler_pb2
from services.cli.status import ClusterSummary, rows_from_proto, rows_to_json
from services.common.convert import instance_spec_to_proto
from services.common.messages import InstanceSpec


def test_each_row_takes_the_block_size_of_its_instances_registration():
    state = scheduler_pb2.ClusterState(
        instances=[
            scheduler_pb2.InstanceState(
                info=instance_spec_to_proto(
                    InstanceSpec(name, f"addr-{name}", "tiny", block_size, 4, 0, 4, 2048, 258, 257)
                ),
                load=common_pb2.LoadReport(instance_id=name, num_total_blocks=64),
                ms_since_report=5,
            )
            for name, block_size in (("a", 8), ("b", 32))
        ]
    )
    rows = rows_from_proto(state)
    assert [(r.spec.instance_id, r.load.block_size, r.ms_since_report) for r in rows] == [
        ("a", 8, 5),
        ("b", 32, 5),
    ]


def test_the_summary_shows_the_group_loop_when_one_runs():
    state = scheduler_pb2.ClusterState(
        dispatch_policy="load_balance",
        migration_policy="none",
        group_policy="kunserve",
        num_groups_dropped=3,
        num_groups_restored=2,
        num_group_operations_failed=1,
    )
    summary = ClusterSummary.from_proto(state)
    assert summary.describe() == (
        "dispatch: load_balance  migration: none (0 ordered)  "
        "groups: kunserve (3 dropped, 2 restored, 1 failed)"
    )
    assert {k: v for k, v in rows_to_json([], summary).items() if "group" in k} == {
        "group_policy": "kunserve",
        "num_groups_dropped": 3,
        "num_groups_restored": 2,
        "num_group_operations_failed": 1,
        "groups": [],
    }
    # An older scheduler (no group policy field) or the default: nothing about groups.
    plain = ClusterSummary.from_proto(scheduler_pb2.ClusterState(dispatch_policy="freest"))
    assert plain.describe() == "dispatch: freest  migration: none (0 ordered)"
