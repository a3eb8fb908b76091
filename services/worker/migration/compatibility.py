"""What two engines must share for a request to continue bit-identically after a move.

The KV block layout (checked by the source against the destination's block size in
bytes) and the kernel backend: "native" and "torch" round differently, so a request
decoded by one and continued by the other would not produce the tokens it would have
produced unmoved. Workers register their backend (InstanceInfo.kernels), the scheduler
pairs only equal ones, and the destination refuses a handshake from another backend.

An engine's backend is `engine.kernels`, resolved when it was built ("native" or
"torch", never "auto"; "none" for a simulated engine).

The device too: a GPU's kernels (cuBLAS, its attention) round differently from the
CPU's, and one GPU model's from another's, so a request moves only between engines on
the same `engine.device_kind` ("cpu", or "cuda:" and the GPU's name). The destination
refuses a handshake from another device ("incompatible_device: ..."); the scheduler
pairs by kernels only, so in a mixed cluster such a refusal is what stops the move.
"""

from __future__ import annotations


def kernels_mismatch(src_kernels: str, dst_kernels: str) -> str | None:
    """Why a request cannot move from kernels `src_kernels` to `dst_kernels`, or None."""
    if src_kernels == dst_kernels:
        return None
    return (
        f"incompatible_kernels: the source runs {src_kernels or 'unknown'!r} kernels, "
        f"this instance {dst_kernels!r}"
    )


def device_mismatch(src_device: str, dst_device: str) -> str | None:
    """Why a request cannot move from an engine on `src_device` to one on `dst_device`
    (their device_kind), or None."""
    if src_device == dst_device:
        return None
    return (
        f"incompatible_device: the source runs on {src_device!r}, this instance on {dst_device!r}"
    )
