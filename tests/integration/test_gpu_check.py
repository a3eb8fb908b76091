"""The device check (bench/gpu_check.py) runs whole on a CPU in a small configuration:
HF-exact tokens (tiny and a random small Llama), a live migration between two worker
processes over the TCP data plane (what a GPU machine given only the small wheelhouse
uses), decode throughput and its roofline fraction; the JSON last line has every key
docs/gpu.md tells people to paste. On a machine with a GPU the same runs on it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
SMALL = [
    "--shape", "small", "--batches", "1,4", "--prompt-len", "16", "--decode-steps", "4",
    "--hf-tokens", "8", "--migration-tokens", "80", "--hbm-gbps", "20", "--json",
]  # fmt: skip


def _run(*args: str) -> tuple[int, list[str], dict]:
    proc = subprocess.run(
        [sys.executable, "-m", "services.cli.main", "bench", "gpu_check", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = proc.stdout.strip().splitlines()
    assert lines, proc.stderr[-3000:]
    result = json.loads(lines[-1]) if lines[-1].startswith("{") else {}
    return proc.returncode, lines, result


def _check_result(rc: int, lines: list[str], result: dict, device: str) -> None:
    assert rc == 0, "\n".join(lines[-30:])
    assert result["tokens_exact"] is True
    assert result["hf_tiny"] == {"exact": True, "sequences": 4, "tokens": 64, "first_diff": []}
    assert result["hf_model"] == {"exact": True, "sequences": 4, "tokens": 32, "first_diff": []}
    assert (result["migration_tokens_exact"], result["migration_moved"]) == (True, True)
    assert result["migration_tokens"] == 80 and result["migration_bytes"] > 0
    assert [r["batch"] for r in result["decode"]] == [1, 4]
    for row in result["decode"]:
        assert row["tokens_per_s"] > 0 and row["roofline_fraction"] > 0
        assert row["weight_bytes"] > 0 and row["kv_bytes"] > 0
        assert row["roofline_tokens_per_s"] == pytest.approx(
            row["batch"] * result["hbm_gbps"] * 1e9 / (row["weight_bytes"] + row["kv_bytes"]),
            rel=1e-3,
        )
    assert result["env"]["device"] == device
    assert any(line.startswith("HF-exact, tiny") for line in lines)  # the table


def test_the_device_check_runs_on_a_cpu_and_its_tokens_are_exact():
    rc, lines, result = _run("--device", "cpu", "--data-plane", "tcp", *SMALL)
    _check_result(rc, lines, result, "cpu")
    assert result["migration_data_plane"] == "tcp"
    assert result["layer_loop_syncs"] is None  # CUDA's sync debug mode: on a GPU only


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)")
def test_the_device_check_runs_on_the_gpu_with_no_host_sync_in_the_layers():
    rc, lines, result = _run("--device", "cuda", *SMALL)
    _check_result(rc, lines, result, "cuda")
    assert result["layer_loop_syncs"] == 0
    assert result["env"]["gpu"]


def test_a_missing_gpu_is_said_plainly():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    rc, lines, _ = _run("--device", "cuda")
    assert rc == 2
    assert lines[-1].endswith("sees no CUDA device") and "llmesh bench gpu_check" in lines[-1]
