"""The Dockerfiles' static check (hadolint is not packaged here; docs/deployment.md,
"Image"): for both the CPU and the CUDA image, in the same way.

- bases pinned to a version tag (never `latest` or none), build args included;
- multi-stage: a build stage compiles, the runtime stage copies from it;
- the project is installed as a package (`pip install .`, not editable) and the native
  kernels are compiled at image build time into the cache the runtime uses;
- the runtime runs as a non-root user; ENTRYPOINT, CMD and HEALTHCHECK are exec form
  and the healthcheck is the entrypoint's gRPC health probe;
- no ADD (so no URLs fetched at build), apt without recommends and without its lists
  left behind, and every COPY source exists and is not excluded by .dockerignore.
"""

from __future__ import annotations

import fnmatch

import pytest

from tests.unit.deploy.dockerfile import (
    DOCKER_DIR,
    DOCKERFILES,
    env_defaults,
    exec_form,
    healthcheck_command,
    instructions,
    stages,
)

REPO_ROOT = DOCKER_DIR.parents[1]
IGNORED = [
    line.strip()
    for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]


def is_ignored(path: str) -> bool:
    return any(
        path == pattern or path.startswith(pattern + "/") or fnmatch.fnmatch(path, pattern)
        for pattern in IGNORED
    )


@pytest.fixture(params=DOCKERFILES)
def dockerfile(request):
    return DOCKER_DIR / request.param


def test_base_images_are_pinned(dockerfile):
    _, found = stages(dockerfile)
    for stage in found:
        name, _, tag = stage.image.rpartition(":")
        assert name and tag and tag != "latest" and any(c.isdigit() for c in tag), stage.image


def test_multi_stage_build_installs_the_package_and_builds_kernels(dockerfile):
    _, (build, runtime) = stages(dockerfile)
    assert (build.name, runtime.name) == ("build", "runtime")
    [install] = [run for run in build.all("RUN") if "pip install" in run]
    assert install.split()[-1] == "." and "-e" not in install.split()
    runs = " ".join(build.all("RUN"))
    assert "llmesh-entrypoint build-kernels" in runs
    cache = env_defaults(build)["LLMESH_KERNEL_CACHE"]
    assert env_defaults(runtime)["LLMESH_KERNEL_CACHE"] == cache
    copied = [c for c in runtime.all("COPY") if c.startswith("--from=build")]
    assert any(c.endswith(f"{cache} {cache}") for c in copied), copied
    assert any("/opt/llmesh/venv" in c for c in copied)
    # gcc stays: a host with another CPU compiles the kernels once at first start.
    assert "gcc" in " ".join(runtime.all("RUN"))


def test_runtime_is_non_root_with_exec_form_entrypoint_and_grpc_healthcheck(dockerfile):
    _, stages_ = stages(dockerfile)
    runtime = stages_[-1]
    user = runtime.last("USER")
    assert user not in (None, "root", "0", "0:0")
    # Nothing runs as root after the switch.
    keywords = [kw for kw, _ in runtime.instructions]
    assert "RUN" not in keywords[keywords.index("USER") :]
    assert exec_form(runtime.last("ENTRYPOINT")) == ["llmesh-entrypoint"]
    assert exec_form(runtime.last("CMD")) == ["worker"]
    assert healthcheck_command(runtime) == ["llmesh-entrypoint", "healthcheck"]
    assert "--start-period=" in runtime.last("HEALTHCHECK")


def test_no_add_apt_hygiene_and_copy_sources_in_the_build_context(dockerfile):
    for keyword, args in instructions(dockerfile):
        assert keyword != "ADD", f"ADD {args}: use COPY (and never fetch URLs)"
        if keyword == "RUN" and "apt-get install" in args:
            assert "--no-install-recommends" in args and "rm -rf /var/lib/apt/lists/*" in args
        if keyword == "COPY" and not args.startswith("--from"):
            *sources, _ = args.split()
            for source in sources:
                assert (REPO_ROOT / source).exists(), source
                assert not is_ignored(source), f"{source} is excluded by .dockerignore"


def test_dockerignore_keeps_environments_and_history_out():
    for path in (".git", ".venv", "tests", "services/x/__pycache__/a.pyc"):
        assert is_ignored(path) or fnmatch.fnmatch(path, "**/*.pyc"), path
