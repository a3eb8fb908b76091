"""The image's ENTRYPOINT, CMD and HEALTHCHECK commands, run outside a container.

They are read from deploy/docker/Dockerfile (so the test follows the file), with the
image's `llmesh-entrypoint` being deploy/docker/entrypoint.sh and the image's ENV
applied (paths moved under a temporary directory): the healthcheck fails while the
service starts, passes once it is SERVING, fails again once SIGTERM made it drain;
`build-kernels` (the image build's step) leaves the compiled kernels in the cache
directory; an unknown role is refused with usage.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from bench._netns_mesh import ENTRYPOINT
from services.common.procs import REPO_ROOT
from tests.unit.deploy.dockerfile import (
    DOCKER_DIR,
    env_defaults,
    exec_form,
    healthcheck_command,
    stages,
)

pytestmark = pytest.mark.timeout(180)
_, STAGES = stages(DOCKER_DIR / "Dockerfile")
RUNTIME = STAGES[-1]


def image_command(argv: list[str]) -> list[str]:
    """argv with the image's entrypoint binary replaced by the script it installs."""
    assert argv[0] == "llmesh-entrypoint"
    return [str(ENTRYPOINT), *argv[1:]]


@pytest.fixture
def image_env(tmp_path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMESH_")}
    for key, value in env_defaults(RUNTIME).items():
        if key == "PATH":
            continue
        env[key] = str(tmp_path / value.lstrip("/")) if value.startswith("/") else value
    env["LLMESH_ENTRYPOINT_PYTHON"] = sys.executable
    env["PYTHONPATH"] = str(REPO_ROOT)
    return env


def run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        image_command(argv), env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )


def test_healthcheck_follows_the_service_from_start_to_drain(image_env):
    healthcheck = healthcheck_command(RUNTIME)
    entrypoint = exec_form(RUNTIME.last("ENTRYPOINT"))
    env = {
        **image_env,
        "LLMESH_SCHEDULER_BIND": "127.0.0.1:0",
        "LLMESH_SCHEDULER_GRACE_S": "1",
        # What a deployment gives every container (compose: a secret file); the
        # healthcheck itself needs none.
        "LLMESH_CLUSTER_SECRET": os.environ["LLMESH_CLUSTER_SECRET"],
    }
    health_env = {k: v for k, v in env.items() if k != "LLMESH_CLUSTER_SECRET"}  # health is open
    starting = run(healthcheck, health_env)
    assert starting.returncode == 1 and "not written yet" in starting.stderr
    proc = subprocess.Popen(
        [*image_command(entrypoint), "scheduler"], env=env, cwd=REPO_ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while (serving := run(healthcheck, health_env)).returncode != 0:
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, serving.stderr + serving.stdout
            time.sleep(0.2)
        assert serving.stdout.strip().endswith(": SERVING")
        # The entrypoint exec'd the service: SIGTERM to its PID is the service's drain.
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        stopped = run(healthcheck, health_env)
        assert stopped.returncode == 1 and "no answer (UNAVAILABLE)" in stopped.stdout
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler"
)
def test_build_kernels_fills_the_image_cache(image_env):
    [step] = [r for r in STAGES[0].all("RUN") if "build-kernels" in r]
    result = run(step.split(), image_env)
    assert result.returncode == 0, result.stderr
    cache = image_env["LLMESH_KERNEL_CACHE"]
    built = sorted(os.listdir(cache))
    assert len(built) == 1 and built[0].startswith("llmesh_kernels-") and built[0].endswith(".so")
    assert result.stdout.strip() == os.path.join(cache, built[0])


def test_unknown_role_is_refused_with_usage(image_env):
    result = run(["llmesh-entrypoint", "sheduler"], image_env)
    assert result.returncode == 64
    assert "usage: entrypoint.sh scheduler|gateway|worker" in result.stderr
    assert "(got: 'sheduler')" in result.stderr
