"""What two engines must share for a request to continue bit-identically after a move.

The KV block layout (checked by the source against the destination's block size in
bytes) and the kernel backend: "native" and "torch" round differently, so a request
decoded by one and continued by the other would not produce the tokens it would have
produced unmoved. Workers register their backend (InstanceInfo.kernels), the scheduler
pairs only equal ones, and the destination refuses a handshake from another backend.
"""

from __future__ import annotations

from services.worker.engine import LLMEngine


def kernel_backend(engine: LLMEngine) -> str:
    """The engine's resolved kernel backend, "native" or "torch" (the one place that asks)."""
    return engine.kernels


def kernels_mismatch(src_kernels: str, dst_kernels: str) -> str | None:
    """Why a request cannot move from kernels `src_kernels` to `dst_kernels`, or None."""
    if src_kernels == dst_kernels:
        return None
    return (
        f"incompatible_kernels: the source runs {src_kernels or 'unknown'!r} kernels, "
        f"this instance {dst_kernels!r}"
    )
