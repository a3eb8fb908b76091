"""Where a receive writes: the caller's `into` tensors, or views of one pooled buffer."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from kvtransport.buffers import BufferPool
from kvtransport.errors import TransferMismatch
from kvtransport.tensors import byte_view, packed_layout, unpack
from kvtransport.wire import TransferHeader


def destinations(
    header: TransferHeader, into: Sequence[torch.Tensor] | None, pool: BufferPool
) -> tuple[list[torch.Tensor], list[np.ndarray], torch.Tensor | None]:
    """(tensors to return, a writable uint8 view of each, the pooled buffer or None).

    `into` must match the sender's tensors one for one in byte size; its dtypes and
    shapes are the caller's (a staging buffer may view the bytes differently).
    """
    specs = header.tensors
    if into is not None:
        if len(into) != len(specs):
            raise TransferMismatch(
                f"into has {len(into)} tensors, transfer {header.transfer_id!r} sends {len(specs)}"
            )
        for index, (tensor, spec) in enumerate(zip(into, specs, strict=True)):
            if tensor.nbytes != spec.nbytes:
                raise TransferMismatch(
                    f"into[{index}] has {tensor.nbytes} bytes, transfer "
                    f"{header.transfer_id!r} sends {spec.nbytes} ({spec.dtype}{list(spec.shape)})"
                )
        return list(into), [byte_view(t) for t in into], None
    offsets, total = packed_layout(specs)
    if total == 0:
        tensors = [torch.empty(spec.shape, dtype=spec.torch_dtype) for spec in specs]
        return tensors, [byte_view(t) for t in tensors], None
    pooled = pool.acquire(total)
    views = [
        pooled[offset : offset + spec.nbytes].numpy()
        for offset, spec in zip(offsets, specs, strict=True)
    ]
    return unpack(pooled, specs, offsets), views, pooled


def copy_inline(payload: bytes, views: Sequence[np.ndarray]) -> int:
    """Copy an inline payload (the tensors' bytes back to back) into views; bytes copied."""
    offset = 0
    for view in views:
        view[:] = np.frombuffer(payload, dtype=np.uint8, count=view.nbytes, offset=offset)
        offset += view.nbytes
    return offset
