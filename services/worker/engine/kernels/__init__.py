"""Native kernels, compiled on first use with the machine's C compiler and cached.

    paged_attention.c   attention over the paged KV pool
    linear.c            matmuls, weight packing
    layer_ops.c         RMSNorm, RoPE, SwiGLU, KV writes
    decoder.c           a step's layer range in one call: the ops above, phase by phase
    vec.h, kernels.h    vectors; the per-phase loop bodies the entry points share

        --cc-->  <cache>/llmesh_kernels-<key>.so, loaded with ctypes (wrapped by ../native.py)

The key hashes the sources, the compiler's version, the flags and the CPU's feature
flags (the build targets -march=native), so a changed source, compiler or machine
builds anew. Where, and with which compiler, is KernelBuildConfig ($LLMESH_KERNEL_CACHE,
else ~/.cache/llmesh/kernels; $CC, else cc or gcc), read once per process by the first
build. Several processes may build at once: each writes its own temporary file and
renames it into place. Set LLMESH_KERNELS=torch (or EngineConfig.kernels) to run
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

from services.common.config import load_config
from services.worker.engine.config import KernelBuildConfig

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
SOURCES = [HERE / name for name in ("paged_attention.c", "layer_ops.c", "linear.c", "decoder.c")]
HEADERS = [HERE / "vec.h", HERE / "kernels.h"]
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


def cache_dir(build: KernelBuildConfig) -> Path:
    return Path(build.cache) if build.cache else Path.home() / ".cache" / "llmesh" / "kernels"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            return next((line for line in cpuinfo if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


def _compiler(build: KernelBuildConfig) -> str:
    compiler = build.compiler or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise KernelBuildError("no C compiler found (set CC, or install gcc)")
    return compiler


def _build(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.stem + ".", suffix=".so.tmp", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run(
            [compiler, *FLAGS, *map(str, SOURCES), "-o", tmp, "-lm"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if result.returncode != 0:
            raise KernelBuildError(
                f"compiling the kernels failed ({compiler}):\n{result.stderr.strip()}"
            )
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


_i64, _i32, _f32, _ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_void_p
SIGNATURES = {
    "llmesh_paged_attention": (
        [_ptr, _i64, _ptr, _ptr, _i64, _i32, _ptr, _i64, _ptr, _ptr, _i32, _ptr, _i64, _i32,
         _i32, _i32, _f32, _i32],
        ctypes.c_int,
    ),
    "llmesh_rms_norm": ([_ptr, _i64, _ptr, _f32, _i64, _i32, _ptr, _i64, _i32], None),
    "llmesh_add_rms_norm": (
        [_ptr, _i64, _ptr, _i64, _ptr, _f32, _i64, _i32, _ptr, _i64, _i32],
        None,
    ),
    "llmesh_rope": ([_ptr, _i64, _i32, _i32, _ptr, _ptr, _i64, _i32], None),
    "llmesh_silu_mul": ([_ptr, _i64, _i64, _i32, _ptr, _i64, _i32], None),
    "llmesh_linear": (
        [_ptr, _i64, _i64, _i32, _ptr, _i32, _ptr, _ptr, _i64, _i32],
        ctypes.c_int,
    ),
    "llmesh_linear_packed": (
        [_ptr, _i64, _i64, _i32, _ptr, _i32, _ptr, _ptr, _i64, _i32],
        ctypes.c_int,
    ),
    "llmesh_pack_weight": ([_ptr, _i32, _i32, _ptr, _i32], None),
    "llmesh_write_kv": ([_ptr, _ptr, _i64, _ptr, _i64, _ptr, _ptr, _i64, _i32, _i32], None),
    "llmesh_decoder_layers": (
        [_ptr, _i64, _ptr, _i32, _i32, _i32, _i32, _i32, _i32, _f32, _f32, _ptr, _ptr, _ptr,
         _i64, _i32, _ptr, _i64, _ptr, _ptr, _i32],
        ctypes.c_int,
    ),
}  # fmt: skip


@functools.cache
def library() -> ctypes.CDLL:
    """The compiled kernels (built on first call), with argument types set. Raises
    KernelBuildError."""
    build = load_config(KernelBuildConfig, "KERNEL")
    compiler = _compiler(build)
    try:
        version = subprocess.run(
            [compiler, "--version"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelBuildError(f"cannot run the C compiler {compiler}: {e}") from e
    texts = [path.read_text() for path in SOURCES + HEADERS]
    key = hashlib.sha256(
        "\0".join([*texts, version, " ".join(FLAGS), _cpu_flags()]).encode()
    ).hexdigest()[:16]
    target = cache_dir(build) / f"llmesh_kernels-{key}.so"
    if not target.exists():
        log.info("compiling the native kernels into %s", target)
        try:
            _build(compiler, target)
        except (OSError, subprocess.SubprocessError) as e:
            raise KernelBuildError(f"cannot build {target}: {e}") from e
    try:
        kernels = ctypes.CDLL(str(target))
    except OSError as e:
        raise KernelBuildError(f"cannot load {target}: {e}") from e
    for name, (argtypes, restype) in SIGNATURES.items():
        fn = getattr(kernels, name)
        fn.argtypes, fn.restype = argtypes, restype
    return kernels
