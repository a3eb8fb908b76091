"""`llmesh status`: the rows it builds from the scheduler's ClusterState."""

from __future__ import annotations

from protos import common_pb2, scheduler_pb2
from services.cli.status import rows_from_proto
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
