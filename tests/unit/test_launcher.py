"""The `./llmesh` launcher's install commands, checked without installing anything
(LLMESH_INSTALL_DRY_RUN=1 prints them): the CPU pin by default; with LLMESH_TORCH=cuda,
torch's CUDA build first (the pinned version, PyTorch's CUDA index: the CUDA image's
default too), remembered by the venv; anything else refused. docs/gpu.md."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.unit.deploy.dockerfile import DOCKER_DIR, stages

REPO_ROOT = Path(__file__).resolve().parents[2]


def _torch_pin() -> str:
    return re.search(r'"(torch==[^"]+)"', (REPO_ROOT / "pyproject.toml").read_text()).group(1)


@pytest.fixture
def launcher(tmp_path: Path):
    """A copy of the launcher and pyproject.toml in a directory of its own: its .venv is
    tmp_path/.venv, so nothing here can touch the project's."""
    for name in ("llmesh", "pyproject.toml"):
        shutil.copy(REPO_ROOT / name, tmp_path / name)

    def run(**env: str) -> subprocess.CompletedProcess:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("LLMESH_")}
        return subprocess.run(
            ["bash", str(tmp_path / "llmesh"), "up"],
            env={**clean, "LLMESH_INSTALL_DRY_RUN": "1", **env},
            capture_output=True,
            text=True,
            timeout=30,
        )

    return tmp_path, run


def _commands(result: subprocess.CompletedProcess) -> list[list[str]]:
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.splitlines()]


def test_the_default_install_is_the_project_with_the_cpu_pin(launcher):
    root, run = launcher
    pip = [str(root / ".venv/bin/python"), "-m", "pip", "install", "--disable-pip-version-check"]
    assert _commands(run()) == [[*pip, "-e", f"{root}[test,bench]"]]
    assert _commands(run(LLMESH_TORCH="cpu")) == [[*pip, "-e", f"{root}[test,bench]"]]


def test_llmesh_torch_cuda_installs_the_pinned_torch_from_the_cuda_index_first(launcher):
    root, run = launcher
    pip = [str(root / ".venv/bin/python"), "-m", "pip", "install", "--disable-pip-version-check"]
    _, cuda_image = stages(DOCKER_DIR / "Dockerfile.cuda")
    image_index = _global_args(DOCKER_DIR / "Dockerfile.cuda")["TORCH_INDEX_URL"]
    assert _commands(run(LLMESH_TORCH="cuda")) == [
        [*pip, "--index-url", image_index, _torch_pin()],
        [*pip, "-e", f"{root}[test,bench]"],
    ]
    # The CUDA image installs the same pin from the same index, then the project.
    [install] = [r for r in cuda_image[0].all("RUN") if "pip install" in r]
    assert f'--index-url "${{TORCH_INDEX_URL}}" "{_torch_pin()}"' in install, install
    assert install.endswith("pip install .")
    other = "https://download.pytorch.org/whl/cu130"
    assert _commands(run(LLMESH_TORCH="cuda", LLMESH_TORCH_INDEX_URL=other))[0][-2] == other


def _global_args(path: Path) -> dict[str, str]:
    args, _ = stages(path)
    return args


def test_a_venv_remembers_its_torch_build(launcher):
    root, run = launcher
    (root / ".venv").mkdir()
    (root / ".venv/.llmesh-torch").write_text("cuda\n")
    assert len(_commands(run())) == 2  # still the CUDA build, without LLMESH_TORCH
    assert len(_commands(run(LLMESH_TORCH="cpu"))) == 1  # unless told otherwise


def test_an_unknown_torch_build_is_refused_naming_it(launcher):
    _, run = launcher
    result = run(LLMESH_TORCH="rocm")
    assert result.returncode == 2
    assert "LLMESH_TORCH must be cpu or cuda, got 'rocm'" in result.stderr
    assert result.stdout == ""
