"""The descriptor-driven strategies reach every kind of field and the edge values
(no mesh needed: these only generate messages)."""

from __future__ import annotations

import math

import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, find, settings

from protos import common_pb2, gateway_pb2, scheduler_pb2, worker_pb2
from tests.fuzz.proto_strategies import malformed_bytes, messages, mutated

SEARCH = settings(
    max_examples=2000, deadline=None, database=None, suppress_health_check=list(HealthCheck)
)


def _find(strategy, condition):
    return find(strategy, condition, settings=SEARCH)


def test_maps_nested_and_repeated_fields_are_filled():
    state = _find(
        messages(common_pb2.RequestState.DESCRIPTOR),
        lambda m: (
            len(m.trace_context) > 0 and m.HasField("sampling") and len(m.prompt_token_ids) > 1
        ),
    )
    assert state.trace_context and state.prompt_token_ids


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_floats_reach_nan_and_infinities(value):
    def hit(m):
        t = m.sampling.temperature
        return math.isnan(t) if math.isnan(value) else t == value

    assert _find(messages(gateway_pb2.GenerateRequest.DESCRIPTOR), hit)


@pytest.mark.parametrize(
    ("field", "value"), [("seq", 2**64 - 1), ("num_running", -(2**31)), ("num_running", 0)]
)
def test_ints_reach_their_extremes(field, value):
    found = _find(messages(common_pb2.LoadReport.DESCRIPTOR), lambda m: getattr(m, field) == value)
    assert getattr(found, field) == value


def test_enums_get_values_they_do_not_define():
    defined = {v.number for v in worker_pb2.MigrationMode.DESCRIPTOR.values}
    found = _find(
        messages(worker_pb2.MigrateOutRequest.DESCRIPTOR), lambda m: m.mode not in defined
    )
    assert found.mode not in defined


def test_a_oneof_holds_one_member():
    command = _find(
        messages(scheduler_pb2.SchedulerCommand.DESCRIPTOR),
        lambda m: m.WhichOneof("command") == "drain",
    )
    assert not command.HasField("migrate")


def test_proto3_optional_is_set_and_unset():
    strategy = messages(common_pb2.SamplingParams.DESCRIPTOR)
    assert _find(strategy, lambda m: m.HasField("seed") and m.seed == -(2**63))
    assert not _find(strategy, lambda m: not m.HasField("seed")).HasField("seed")


def test_mutations_keep_most_of_a_valid_request():
    seed = gateway_pb2.GenerateRequest(
        prompt_token_ids=[1, 2, 3], sampling=common_pb2.SamplingParams(max_tokens=4)
    )
    changed = _find(
        mutated(seed),
        lambda m: m.sampling.max_tokens != 4 and list(m.prompt_token_ids) == [1, 2, 3],
    )
    assert changed.sampling.max_tokens != 4


def test_malformed_bytes_include_undecodable_ones():
    def undecodable(data):
        try:
            worker_pb2.SubmitRequest.FromString(data)
        except DecodeError:
            return True
        return False

    assert _find(malformed_bytes(worker_pb2.SubmitRequest.DESCRIPTOR, []), undecodable)
