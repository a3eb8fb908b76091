"""Bytes that are not a request, and requests over the servers' receive limit.

Every RPC gets `CASES_PER_RPC` wire-level malformed payloads (random bytes, a valid
request cut short, a field with the wrong wire type, a string that is not UTF-8, a
length prefix past the end, absurd nesting): the server answers INVALID_ARGUMENT for
what does not parse (or handles what happens to parse like any request) and stays up.
One request per RPC and server over `grpc.max_receive_message_length` must answer
RESOURCE_EXHAUSTED before any handler runs.
"""

from __future__ import annotations

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.grpc_server import SERVER_OPTIONS
from tests.fuzz import harness
from tests.fuzz.conftest import SCALE
from tests.fuzz.proto_strategies import malformed_bytes
from tests.fuzz.rpc_catalog import all_methods
from tests.fuzz.seeds import seeds_for

CASES_PER_RPC = 40 * SCALE
MAX_RECEIVE_BYTES = dict(SERVER_OPTIONS)["grpc.max_receive_message_length"]


@pytest.mark.parametrize("rpc", all_methods(), ids=lambda rpc: rpc.name)
def test_malformed_bytes_answer_invalid_argument(rpc, fuzz_mesh, facts):
    addresses = facts.addresses_serving(rpc.service)
    payloads = malformed_bytes(rpc.request_type, seeds_for(rpc.name, facts))
    batches = (
        st.lists(payloads, min_size=1, max_size=3)
        if rpc.client_streaming
        else payloads.map(lambda data: [data])
    )

    @settings(max_examples=CASES_PER_RPC)
    @given(batch=batches, target=st.sampled_from(addresses))
    def case(batch, target):
        harness.count_case("malformed")
        code = harness.call_raw(harness.channel_to(target), rpc, batch)
        harness.count_answer(f"{rpc.name} (malformed)", code.name)
        assert code in rpc.documented_codes | {grpc.StatusCode.INVALID_ARGUMENT}, (
            f"{rpc.name} at {target} answered {code.name} to malformed bytes {batch!r:.500}"
        )
        assert harness.dead_processes(fuzz_mesh) == [], f"a process died after {rpc.name}"

    case()


@pytest.mark.parametrize("rpc", all_methods(), ids=lambda rpc: rpc.name)
def test_oversized_request_is_resource_exhausted(rpc, fuzz_mesh, facts):
    # A valid encoding: an unknown length-delimited field (number 1000) just over the limit.
    size = MAX_RECEIVE_BYTES + 1
    payload = b"\xc2\x3e" + _varint(size) + b"\x00" * size
    for target in facts.addresses_serving(rpc.service):
        harness.count_case("oversized")
        code = harness.call_raw(
            harness.channel_to(target, unlimited_send=True), rpc, [payload], timeout_s=30.0
        )
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, f"{rpc.name} at {target}: {code}"
    assert harness.dead_processes(fuzz_mesh) == []


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)
