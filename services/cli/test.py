"""`llmesh test [PYTEST ARGS...]`: lint (ruff) then the whole pytest suite."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HELP = "run ruff and the test suite (extra arguments go to pytest)"

REPO_ROOT = Path(__file__).resolve().parents[2]
PYTEST_NO_TESTS = 5


def add_arguments(parser) -> None:
    parser.add_argument("pytest_args", nargs="*", help="arguments passed to pytest")


def run(args) -> int:
    return run_passthrough(args.pytest_args)


def run_passthrough(argv: list[str]) -> int:
    print("== ruff check", flush=True)
    lint = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=REPO_ROOT)
    if lint.returncode != 0:
        print("llmesh test: ruff found problems (fix them or run `.venv/bin/ruff check --fix .`)")
        return lint.returncode
    print("== pytest", flush=True)
    result = subprocess.run([sys.executable, "-m", "pytest", *argv], cwd=REPO_ROOT)
    if result.returncode == PYTEST_NO_TESTS:
        print("llmesh test: pytest collected no tests; that is a failure, not a pass")
    return result.returncode
