"""A live mesh for the fuzzers, and the hypothesis profiles that size the run.

The fuzz package gets its own mesh (real scheduler, gateway, 2 workers, tiny model, as
in tests/integration): fuzzed internal RPCs deregister, drain, migrate and group real
instances, so they must not share a mesh with tests that expect an undisturbed one.
Before the first case it records a normal Generate's tokens; after every test every
process must be alive and every worker idle with its block manager's integrity check
clean, and after the package the same Generate must return the same tokens.

Profiles (`LLMESH_FUZZ_PROFILE`): `ci` (default; derandomized, about 11,000 cases)
and `long` (10x the cases, a random seed each run; set HYPOTHESIS_SEED to replay).
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

from gateway.client import Client
from services.common.procs import LocalMesh
from tests.fuzz import harness
from tests.fuzz.restore import restore_mesh
from tests.integration.conftest import NUM_WORKERS, wait_worker_idle

_COMMON = dict(
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)
settings.register_profile("ci", derandomize=True, **_COMMON)
settings.register_profile("long", derandomize=False, **_COMMON)
PROFILE = os.environ.get("LLMESH_FUZZ_PROFILE", "ci")
settings.load_profile(PROFILE)
SCALE = {"ci": 1, "long": 10}[PROFILE]

BASELINE_PROMPT = [3, 14, 15, 92, 65, 35]


def baseline_tokens(mesh: LocalMesh) -> list[int]:
    with Client(mesh.gateway_address, timeout_s=60.0) as client:
        return list(
            client.generate(
                prompt_token_ids=BASELINE_PROMPT, max_tokens=12, seed=11, temperature=0.7
            ).token_ids
        )


@pytest.fixture(scope="package")
def fuzz_mesh(tmp_path_factory):
    mesh = LocalMesh(
        log_dir=tmp_path_factory.mktemp("fuzz-mesh"),
        num_workers=NUM_WORKERS,
        env={"LLMESH_WORKER_TORCH_THREADS": "1"},
    )
    mesh.start()
    try:
        undisturbed = baseline_tokens(mesh)
        yield mesh
        restore_mesh(mesh)
        assert harness.dead_processes(mesh) == []
        assert baseline_tokens(mesh) == undisturbed, "the fuzzed mesh answers differently"
    finally:
        harness.close_channels()
        mesh.stop()
    assert [p.name for p in mesh.processes() if p.is_alive()] == []


@pytest.fixture
def facts(fuzz_mesh) -> harness.MeshFacts:
    return harness.mesh_facts(fuzz_mesh)


@pytest.fixture(autouse=True)
def _fuzz_mesh_left_clean(request):
    """After each batch: every process alive, the mesh restored, every block free."""
    yield
    if "fuzz_mesh" not in request.fixturenames:
        return
    mesh: LocalMesh = request.getfixturevalue("fuzz_mesh")
    assert harness.dead_processes(mesh) == [], "a fuzzed process died"
    restore_mesh(mesh)
    for worker in mesh.live_workers():
        report = wait_worker_idle(worker.address, timeout_s=30.0)
        assert report.is_integrity_checked
        assert report.integrity_error == "", f"{worker.name}: {report.integrity_error}"
        load = report.load
        assert (load.num_running, load.num_waiting, load.num_used_blocks) == (0, 0, 0)


def pytest_terminal_summary(terminalreporter):
    if harness.CASE_COUNT["total"]:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(harness.CASE_COUNT.items()))
        terminalreporter.write_line(f"fuzz cases ({PROFILE} profile): {counts}")
    if os.environ.get("LLMESH_FUZZ_ANSWERS"):  # what each method answered, for the docs
        for (what, status), count in sorted(harness.ANSWERS.items()):
            terminalreporter.write_line(f"  {what:70s} {status:20s} {count}")
