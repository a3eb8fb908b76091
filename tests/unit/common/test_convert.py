"""services.common.convert: protobuf <-> dataclasses round trips, and edge checks."""

from __future__ import annotations

import dataclasses
import math

import pytest

from protos import common_pb2, worker_pb2
from services.common.convert import (
    instance_spec_from_proto,
    instance_spec_to_proto,
    kernels_from_proto,
    kernels_to_proto,
    load_from_proto,
    load_to_proto,
    migration_mode_from_proto,
    migration_mode_to_proto,
    migration_status_from_proto,
    migration_status_to_proto,
    outputs_from_proto,
    outputs_to_proto,
    request_from_proto,
    request_to_proto,
)
from services.common.messages import (
    FinishReason,
    InstanceSpec,
    LoadReport,
    OutputDelta,
    RequestSpec,
    SamplingSpec,
)
from services.common.migration import MigrationMode, MigrationStatus
from services.policies import InstanceLoad, RunningRequest


def test_instance_spec_round_trip():
    spec = InstanceSpec(
        "w", "h:1", "tiny", 16, 4, 0, 4, 2048, 258, 257, 1 << 28, b"\x01ucx", "ucx", "native"
    )
    info = instance_spec_to_proto(spec)
    assert info.kernels == common_pb2.KERNEL_BACKEND_NATIVE
    assert instance_spec_from_proto(info) == spec


@pytest.mark.parametrize(
    ("kernels", "value"),
    [
        ("", common_pb2.KERNEL_BACKEND_UNSPECIFIED),
        ("native", common_pb2.KERNEL_BACKEND_NATIVE),
        ("torch", common_pb2.KERNEL_BACKEND_TORCH),
    ],
)
def test_kernel_backends_map_one_to_one(kernels, value):
    assert (kernels_to_proto(kernels), kernels_from_proto(value)) == (value, kernels)


def test_an_unknown_kernel_backend_is_refused_going_out_and_read_as_unknown_coming_in():
    with pytest.raises(ValueError, match="kernels='none' is not one of"):
        kernels_to_proto("none")
    assert kernels_from_proto(9) == ""  # e.g. a newer worker's backend


def test_a_registration_with_a_newer_kernel_backend_still_reads():
    spec = InstanceSpec("w", "h:1", "tiny", 16, 4, 0, 4, 2048, 258, 257, kernels="native")
    info = instance_spec_to_proto(spec)
    info.kernels = 9
    assert instance_spec_from_proto(info) == dataclasses.replace(spec, kernels="")


def test_migration_mode_and_status_enums_map_to_the_internal_ones():
    assert [migration_mode_to_proto(m) for m in MigrationMode] == [
        worker_pb2.MIGRATION_MODE_LIVE,
        worker_pb2.MIGRATION_MODE_BLOCKING_COPY,
        worker_pb2.MIGRATION_MODE_RECOMPUTE,
    ]
    assert [migration_mode_from_proto(migration_mode_to_proto(m)) for m in MigrationMode] == list(
        MigrationMode
    )
    # An unset mode is a live migration.
    assert migration_mode_from_proto(worker_pb2.MIGRATION_MODE_UNSPECIFIED) is MigrationMode.LIVE
    assert [migration_status_to_proto(s) for s in MigrationStatus] == list(range(1, 7))
    assert [migration_status_from_proto(v) for v in range(1, 7)] == list(MigrationStatus)
    with pytest.raises(ValueError, match="status=0 is not a known value"):
        migration_status_from_proto(worker_pb2.MIGRATION_STATUS_UNSPECIFIED)
    with pytest.raises(ValueError, match="mode=7 is not a known value"):
        migration_mode_from_proto(7)


def test_load_round_trip_keeps_infinity():
    load = InstanceLoad(
        "w", 100, 40, 2, 1, 5, 1, True, 1, math.inf, -math.inf,
        (RunningRequest("r", 20, 2, 1),), 7, 10, 3,
    )  # fmt: skip
    report = LoadReport(load, seq=9, is_integrity_checked=True, integrity_error="bad")
    assert load_from_proto(load_to_proto(report), block_size=16) == report


def test_the_block_size_comes_from_the_registration_not_the_report():
    report = LoadReport(InstanceLoad("w", 100, 40, 2, 1, block_size=32), seq=1)
    assert load_from_proto(load_to_proto(report), block_size=8).load.block_size == 8


def test_request_round_trip_and_required_fields():
    spec = RequestSpec(
        request_id="r",
        prompt_token_ids=(1, 2),
        sampling=SamplingSpec(4, 0.5, 0.75, 3, 11, (9,), True),
        output_token_ids=(5,),
        priority=1,
        arrival_time=12.5,
        owner_address="gw:1",
        trace_context={"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"},
    )
    assert request_from_proto(request_to_proto(spec)) == spec
    state = request_to_proto(spec)
    state.sampling.ClearField("seed")
    with pytest.raises(ValueError, match="state.sampling.seed must be set"):
        request_from_proto(state)
    with pytest.raises(ValueError, match="state.owner_address"):
        request_from_proto(common_pb2.RequestState(request_id="r"))


def test_output_batch_round_trip():
    deltas = [OutputDelta("a", 0, (1, 2)), OutputDelta("b", 3, (), FinishReason.ERROR, "boom")]
    batch = outputs_to_proto("w", deltas)
    assert batch.instance_id == "w"
    assert outputs_from_proto(batch) == deltas


def test_an_unknown_finish_reason_is_a_value_error_naming_it():
    batch = outputs_to_proto("w", [OutputDelta("a", 0, (1,), FinishReason.STOP)])
    batch.outputs[0].finish_reason = 9
    with pytest.raises(ValueError, match="finish_reason=9 is not a known value"):
        outputs_from_proto(batch)
