"""The services of a compose file as docker-compose resolves them for a given .env.

    services = resolved_services("head.yaml", {"HEAD_ADDRESS": "10.0.0.1", ...})
    services["scheduler"]["command"], services["scheduler"]["environment"]

Runs `docker-compose config` (Debian's docker-compose 1.29; `.ci/run` installs it) so
interpolation, `extends` and overlays are docker-compose's own, not a re-implementation:
the network-namespace test and bench start each service with exactly the command and
environment a container of these files would get, and break if the files drift.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

COMPOSE_DIR = Path(__file__).resolve().parents[1] / "deploy" / "compose"
ENV_EXAMPLE = COMPOSE_DIR / ".env.example"


class ComposeError(RuntimeError):
    """docker-compose is missing or refused the files; the message has its output."""


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of a .env file (comments and blank lines skipped)."""
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def compose_config(files: Sequence[str], env: Mapping[str, str]) -> str:
    """`docker-compose -f FILE... --env-file ENV config` output; env is the whole .env
    (the process environment is not passed, so nothing from this shell leaks in)."""
    binary = shutil.which("docker-compose")
    if binary is None:
        raise ComposeError("docker-compose is not installed (apt-get install docker-compose)")
    with tempfile.NamedTemporaryFile("w", suffix=".env", delete=False) as env_file:
        env_file.write("".join(f"{key}={value}\n" for key, value in env.items()))
    try:
        args = [binary, "--project-directory", str(COMPOSE_DIR)]
        for name in files:
            args += ["-f", str(COMPOSE_DIR / name)]
        result = subprocess.run(
            [*args, "--env-file", env_file.name, "config"],
            capture_output=True,
            text=True,
            timeout=120,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        )
    finally:
        os.unlink(env_file.name)
    if result.returncode != 0:
        raise ComposeError(f"docker-compose {' '.join(files)} config failed:\n{result.stderr}")
    return result.stdout


def resolved_services(files: Sequence[str], env: Mapping[str, str]) -> dict[str, dict]:
    """Service name -> its resolved definition."""
    return yaml.safe_load(compose_config(files, env))["services"]


def service_environment(service: Mapping) -> dict[str, str]:
    """A resolved service's environment as strings (a key without value is empty)."""
    environment = service.get("environment") or {}
    return {key: "" if value is None else str(value) for key, value in environment.items()}
