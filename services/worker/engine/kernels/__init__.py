"""Native kernels, compiled on first use with the machine's C compiler and cached.

    paged_attention.c  ->  <cache>/paged_attention-<key>.so   (loaded with ctypes)

The key hashes the source, the compiler's version, the flags and the CPU's feature
flags (the build targets -march=native), so a changed source, compiler or machine
builds anew. The cache is $LLMESH_KERNEL_CACHE, else ~/.cache/llmesh/kernels. Several
processes may build at once: each writes its own temporary file and renames it into
place. Set LLMESH_ATTENTION_BACKEND=torch (or EngineConfig.attention_backend) to run
without a compiler.

The library links libgomp, the OpenMP runtime torch itself uses and has already loaded
(same soname), so its threads are torch's threads (torch.set_num_threads holds).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch  # noqa: F401  (loads torch's libgomp before ours resolves it)

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("paged_attention.c")
FLAGS = [
    "-O3",
    "-std=gnu11",
    "-march=native",
    "-fPIC",
    "-shared",
    "-fopenmp",
    # Bits must not depend on the compiler's choices: no a*b+c fusion, no reassociation.
    "-ffp-contract=off",
    "-fno-fast-math",
]


class KernelBuildError(RuntimeError):
    """The native kernels could not be compiled or loaded (message says why)."""


def cache_dir() -> Path:
    configured = os.environ.get("LLMESH_KERNEL_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "llmesh" / "kernels"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            return next((line for line in cpuinfo if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


def _compiler() -> str:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise KernelBuildError("no C compiler found (set CC, or install gcc)")
    return compiler


def _build(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.stem + ".", suffix=".so.tmp", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run(
            [compiler, *FLAGS, str(SOURCE), "-o", tmp, "-lm"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if result.returncode != 0:
            raise KernelBuildError(
                f"compiling {SOURCE.name} failed ({compiler}):\n{result.stderr.strip()}"
            )
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def paged_attention_library() -> ctypes.CDLL:
    """The compiled paged-attention kernel (built on first call). Raises KernelBuildError."""
    compiler = _compiler()
    try:
        version = subprocess.run(
            [compiler, "--version"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelBuildError(f"cannot run the C compiler {compiler}: {e}") from e
    key = hashlib.sha256(
        "\0".join([SOURCE.read_text(), version, " ".join(FLAGS), _cpu_flags()]).encode()
    ).hexdigest()[:16]
    target = cache_dir() / f"{SOURCE.stem}-{key}.so"
    if not target.exists():
        log.info("compiling %s into %s", SOURCE.name, target)
        try:
            _build(compiler, target)
        except (OSError, subprocess.SubprocessError) as e:
            raise KernelBuildError(f"cannot build {target}: {e}") from e
    try:
        library = ctypes.CDLL(str(target))
    except OSError as e:
        raise KernelBuildError(f"cannot load {target}: {e}") from e
    fn = library.llmesh_paged_attention
    i64, i32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    fn.argtypes = [
        ptr, i64, ptr, ptr, i64, i32, ptr, i64, ptr, ptr, i32, ptr, i64, i32, i32, i32,
        ctypes.c_float, i32,
    ]  # fmt: skip
    fn.restype = ctypes.c_int
    return library
