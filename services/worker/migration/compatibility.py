"""What two engines must share for a request to continue bit-identically after a move.

The KV block layout (checked by the source against the destination's block size in
bytes) and the kernel backend: "native" and "torch" round differently, so a request
decoded by one and continued by the other would not produce the tokens it would have
produced unmoved. Workers register their backend (InstanceInfo.kernels), the scheduler
pairs only equal ones, and the destination refuses a handshake from another backend.

An engine's backend is `engine.kernels`, resolved when it was built ("native" or
"torch", never "auto"; "none" for a simulated engine).
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
