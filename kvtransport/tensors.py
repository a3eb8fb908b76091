"""Torch tensors as raw bytes: zero-copy numpy views for sending, and receive layouts.

Every dtype travels as its bytes (bf16 included, as a uint8 view), so the wire never
needs to know what a dtype means; only the receiver rebuilds the dtype and shape.
"""

from __future__ import annotations

import math
import mmap
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

HUGE_PAGE_BYTES = 2 << 20

# Offsets of tensors packed into one receive buffer are aligned to this, so a uint8
# slice can always be re-viewed as any dtype (view() needs an aligned storage offset).
PACK_ALIGNMENT = 64

_DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in _DTYPES.items()}


@dataclass(frozen=True)
class TensorSpec:
    """What a receiver needs to rebuild one tensor: dtype name and shape."""

    dtype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"unsupported dtype {self.dtype!r}; supported: {sorted(_DTYPES)}")
        if any(not isinstance(dim, int) or dim < 0 for dim in self.shape):
            raise ValueError(f"shape must be non-negative integers, got {self.shape!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.torch_dtype.itemsize


def spec_of(tensor: torch.Tensor) -> TensorSpec:
    if tensor.dtype not in _NAMES:
        raise ValueError(f"unsupported dtype {tensor.dtype}; supported: {sorted(_DTYPES)}")
    return TensorSpec(_NAMES[tensor.dtype], tuple(tensor.shape))


def as_sendable(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor itself when it can be sent without a copy, else a contiguous copy."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.device.type != "cpu":
        raise ValueError(f"only CPU tensors are supported, got device {tensor.device}")
    return tensor.detach().contiguous()


def check_receivable(tensor: torch.Tensor, index: int) -> None:
    """A receive writes raw bytes into `tensor`, so it must be contiguous CPU memory."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"into[{index}] must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.device.type != "cpu":
        raise ValueError(f"into[{index}] must be on the CPU, got device {tensor.device}")
    if not tensor.is_contiguous():
        raise ValueError(f"into[{index}] must be contiguous to be received into")


def huge_page_empty(nbytes: int) -> torch.Tensor:
    """An uninitialised 1-D uint8 CPU tensor of nbytes, on transparent huge pages where
    the OS allows them (2 MiB aligned, madvise(MADV_HUGEPAGE)), else from torch.empty.

    For buffers that KV moves through. UCX's CMA path copies with process_vm_readv,
    which walks the remote process's pages: with 2 MiB pages on both sides a stream of
    4 MiB transfers ran at 4.2-4.7 GB/s on the CI machine instead of 3.5-4.0. Fault a
    new one in off the event loop (huge-page faults may compact memory for a while).
    The tensor owns the mapping: it is unmapped when the last view of it goes.
    """
    if nbytes < HUGE_PAGE_BYTES or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(nbytes, dtype=torch.uint8)
    try:
        region = mmap.mmap(
            -1, nbytes + HUGE_PAGE_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        )
        region.madvise(mmap.MADV_HUGEPAGE)
    except (OSError, ValueError):  # no THP here (e.g. disabled): plain pages will do
        return torch.empty(nbytes, dtype=torch.uint8)
    start = torch.frombuffer(region, dtype=torch.uint8, count=1).data_ptr()
    offset = -start % HUGE_PAGE_BYTES
    return torch.frombuffer(region, dtype=torch.uint8, offset=offset, count=nbytes)


def byte_view(tensor: torch.Tensor) -> np.ndarray:
    """Flat uint8 numpy view sharing the tensor's memory (no copy; keeps it alive)."""
    if tensor.dtype is torch.uint8 and tensor.dim() == 1 and not tensor.requires_grad:
        return tensor.numpy()  # flat byte buffers (pooled, staging): a third of the cost
    return tensor.detach().reshape(-1).view(torch.uint8).numpy()


def packed_layout(specs: Sequence[TensorSpec]) -> tuple[list[int], int]:
    """Byte offsets of each tensor when packed into one buffer, and the buffer size.

    | t0 | pad | t1 ... | pad | t2 |        each offset % PACK_ALIGNMENT == 0
    """
    offsets, end = [], 0
    for spec in specs:
        start = -(-end // PACK_ALIGNMENT) * PACK_ALIGNMENT
        offsets.append(start)
        end = start + spec.nbytes
    return offsets, end


def unpack(buffer: torch.Tensor, specs: Sequence[TensorSpec], offsets: Sequence[int]):
    """Tensors of the given specs viewing `buffer` (uint8) at the given offsets."""
    tensors = []
    for spec, offset in zip(specs, offsets, strict=True):
        raw = buffer[offset : offset + spec.nbytes]
        tensors.append(raw.view(spec.torch_dtype).view(spec.shape))
    return tensors
