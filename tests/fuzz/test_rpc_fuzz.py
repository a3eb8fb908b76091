"""Every RPC of the live mesh, called with generated request messages.

Each method gets `CASES_PER_RPC` cases (mostly-valid mutations of a real request plus
arbitrary messages of its type, `proto_strategies.requests`), sent raw to a server that
serves it; the answer must be one of the method's documented status codes
(rpc_catalog, docs/mesh.md "Status codes") and every process must still be alive.
"""

from __future__ import annotations

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.api_keys import PUBLIC_SERVICES
from services.common.auth_interceptors import OPEN_SERVICES
from tests.fuzz import harness
from tests.fuzz.conftest import SCALE
from tests.fuzz.proto_strategies import requests
from tests.fuzz.rpc_catalog import all_methods
from tests.fuzz.seeds import cap_cost, seeds_for

CASES_PER_RPC = 240 * SCALE
# Also as an outsider (no cluster credentials): fewer cases; every internal RPC must
# answer exactly UNAUTHENTICATED, the open services (the gateway's public API, health,
# reflection) their documented codes.
CASES_PER_RPC_ANONYMOUS = 20 * SCALE
MAX_STREAM_MESSAGES = 3
OPEN_TO_OUTSIDERS = {*OPEN_SERVICES, *PUBLIC_SERVICES}


def _describe(message) -> str:
    text = str(message)
    return text if len(text) < 2000 else text[:2000] + "..."


@pytest.mark.parametrize("caller", ["member", "anonymous"])
@pytest.mark.parametrize("rpc", all_methods(), ids=lambda rpc: rpc.name)
def test_rpc_answers_only_documented_codes(rpc, caller, fuzz_mesh, facts):
    with_credentials = caller == "member"
    addresses = facts.addresses_serving(rpc.service)
    strategy = requests(seeds_for(rpc.name, facts), rpc.request_type).map(cap_cost)
    if rpc.client_streaming:
        strategy = st.lists(strategy, min_size=0, max_size=MAX_STREAM_MESSAGES)
    else:
        strategy = strategy.map(lambda message: [message])

    @settings(max_examples=CASES_PER_RPC if with_credentials else CASES_PER_RPC_ANONYMOUS)
    @given(batch=strategy, target=st.sampled_from(addresses))
    def case(batch, target):
        harness.count_case("rpc" if with_credentials else "rpc_anonymous")
        channel = harness.channel_to(target, with_credentials=with_credentials)
        code = harness.call_raw(channel, rpc, [m.SerializeToString() for m in batch])
        harness.count_answer(rpc.name, code.name)
        if not with_credentials and rpc.service not in OPEN_TO_OUTSIDERS:
            assert code == grpc.StatusCode.UNAUTHENTICATED, (
                f"{rpc.name} at {target} answered {code.name} to an outsider"
            )
        assert code in rpc.documented_codes, (
            f"{rpc.name} at {target} answered {code.name}, not documented; request(s):\n"
            + "\n---\n".join(_describe(m) for m in batch)
        )
        assert harness.dead_processes(fuzz_mesh) == [], f"a process died after {rpc.name}"

    case()
