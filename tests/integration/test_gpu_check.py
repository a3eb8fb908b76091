"""The device check (bench/gpu_check.py) runs whole on a CPU in a small configuration:
HF-exact tokens (tiny and a random small Llama), a live migration between two worker
processes over the TCP data plane (what a GPU machine given only the small wheelhouse
uses), decode throughput and its roofline fraction; the JSON last line has every key
docs/gpu.md tells people to paste. On a machine with a GPU the same runs on it."""

from __future__ import annotations

import json
import os
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
    same = {"exact": True, "first_diff": [], "batched_equals_alone": True, "sequences": 4}
    assert result["hf_tiny"] == {**same, "tokens": 64}
    assert result["hf_model"] == {**same, "tokens": 32}
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


@pytest.mark.slow
@pytest.mark.timeout(900)  # a loaded 2-core machine took 4 minutes
def test_the_device_check_runs_on_a_cpu_and_its_tokens_are_exact():
    rc, lines, result = _run("--device", "cpu", "--data-plane", "tcp", *SMALL)
    _check_result(rc, lines, result, "cpu")
    assert result["migration_data_plane"] == "tcp"
    assert result["layer_loop_syncs"] is None  # CUDA's sync debug mode: on a GPU only
    assert result["device_busy"] == {"batch": 4, "kernel_ms_per_step": None}  # the same


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)")
@pytest.mark.timeout(900)
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


def _script(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("LLMESH_", "PYTHON"))}
    return subprocess.run(
        ["bash", str(REPO_ROOT / "bench" / "gpu_check.sh"), *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.timeout(900)
def test_the_script_runs_the_check_with_a_given_python_and_its_packages():
    """bench/gpu_check.sh with this Python standing for the machine's (its packages
    import already, so the wheelhouse is not needed): the check runs, its JSON last."""
    env = {"PYTHON": sys.executable, "LLMESH_GPU_CHECK_VENV": sys.prefix}
    proc = _script(env, "--device", "cpu", "--skip-migration", *SMALL)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"torch {torch.__version__}" in proc.stdout.splitlines()[0]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["tokens_exact"] is True and "migration_tokens_exact" not in result


def test_the_script_refuses_a_python_without_torch_and_a_missing_wheelhouse(tmp_path):
    without_torch = tmp_path / "python-without-torch"
    without_torch.write_text('#!/bin/sh\nexec /usr/bin/env python3 -S -I "$@"\n')
    without_torch.chmod(0o755)
    proc = _script({"PYTHON": str(without_torch)}, "--device", "cpu")
    assert proc.returncode == 2
    assert "needs Python >= 3.11 and torch 2.x" in proc.stderr
    empty_venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(empty_venv)], check=True)
    proc = _script(
        {"PYTHON": sys.executable, "LLMESH_GPU_CHECK_VENV": str(empty_venv)},
        "--wheelhouse", str(tmp_path / "none"), "--device", "cpu",
    )  # fmt: skip
    assert proc.returncode == 2
    assert f"no wheelhouse at {tmp_path / 'none'}" in proc.stderr
