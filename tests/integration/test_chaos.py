"""The chaos matrix in CI: `llmesh bench chaos` with >= 50 seeded SIGKILL/restart faults
(a worker at each migration stage, source and destination; a KunServe member mid KV
exchange, sender and peer; a decoding worker; the scheduler; a gateway) under a steady
streaming load, on its own mesh of real processes (bench/chaos.py).

Every request ends exactly as an undisturbed run (resumed on the other gateway, or
re-submitted by the SDK when the resume found it on no worker, where its gateway died),
or failed with a status because its gateway died and no gateway was up to resume on; every survivor is idle with no block
held and its block manager intact; the mesh still serves through both gateways.
"""

from __future__ import annotations

import json

import pytest

from bench import chaos
from bench._chaos_faults import ALL_KINDS

pytestmark = pytest.mark.timeout(1500)  # a guard against a hang, not a speed check
SEED = 22
NUM_FAULTS = 50


def test_chaos_matrix_loses_nothing(tmp_path, capsys):
    code = chaos.main(
        ["--seed", str(SEED), "--faults", str(NUM_FAULTS), "--workers", "5",
         "--log-dir", str(tmp_path)]
    )  # fmt: skip
    out = capsys.readouterr().out
    print(out)  # the table, on failure
    summary = json.loads(out.strip().splitlines()[-1])

    assert [line for line in out.splitlines() if line.startswith("VIOLATION")] == []
    assert summary["violations"] == 0
    assert summary["leaked_blocks"] == 0
    assert summary["survivors"] == 5  # every killed worker was replaced
    assert summary["faults"] >= NUM_FAULTS
    assert summary["seed"] == SEED
    # Every kind of fault was injected, each hitting requests that ended well.
    by_kind = summary["by_kind"]
    assert sorted(by_kind) == sorted(ALL_KINDS)
    assert {kind: row["faults"] >= 1 for kind, row in by_kind.items()} == dict.fromkeys(
        ALL_KINDS, True
    )
    assert all(row["violation"] == 0 for row in by_kind.values())
    assert by_kind["gateway"]["requests"] > 0
    # A request failed only when a gateway died under it; all others are exact.
    assert summary["failed"] <= by_kind["gateway"]["requests"]
    outcomes = ("exact", "resumed", "resubmitted", "failed")
    assert sum(summary[o] for o in outcomes) == summary["requests"]
    assert summary["exact"] > summary["failed"]
    assert code == 0
