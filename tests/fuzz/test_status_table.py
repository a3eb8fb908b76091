"""The fuzzers' table of documented status codes is the one in docs/mesh.md, and it
has a row for every RPC the descriptors define (a new RPC fails here until documented)."""

from __future__ import annotations

import re
from pathlib import Path

import grpc

from tests.fuzz.rpc_catalog import EXTRA_CODES, all_methods

DOCS = Path(__file__).resolve().parents[2] / "docs" / "mesh.md"
CODE_NAMES = {code.name for code in grpc.StatusCode}


def _documented_rows() -> dict[str, set[str]]:
    text = DOCS.read_text()
    section = text.split("## Status codes", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        match = re.match(r"\| `([^`]+)` \| (.*) \|$", line)
        if match:
            words = set(re.findall(r"[A-Z_]{2,}", match.group(2)))
            rows[match.group(1)] = words & CODE_NAMES
    return rows


def test_every_rpc_has_a_row():
    names = {rpc.name for rpc in all_methods()}
    assert names == set(EXTRA_CODES)
    assert len(names) >= 34  # the services of protos/*.proto, health and reflection


def test_docs_table_equals_the_fuzzers_table():
    assert _documented_rows() == {
        name: {code.name for code in codes} for name, codes in EXTRA_CODES.items()
    }


def test_the_ci_budget_is_at_least_ten_thousand_cases():
    """The per-test max_examples of the ci profile add up to >= 10,000 (hypothesis stops
    early only where a request type has few distinct values, e.g. GetModelInfoRequest
    has no fields; the run's real count is printed at the end: "fuzz cases ...")."""
    from tests.fuzz import test_http_fuzz, test_malformed, test_rpc_fuzz
    from tests.fuzz.conftest import SCALE

    assert SCALE >= 1
    num_rpcs = len(all_methods())
    budget = (
        num_rpcs * (test_rpc_fuzz.CASES_PER_RPC + test_rpc_fuzz.CASES_PER_RPC_ANONYMOUS)
        + num_rpcs * test_malformed.CASES_PER_RPC
        + 3 * test_http_fuzz.CASES_PER_ENDPOINT
    )
    assert budget >= 10_000, budget
