"""BufferPool: receive buffers recycled by size class.

Repeated block transfers (migration stages, KV exchange, activations of one shape) ask
for the same sizes over and over; reusing the same memory avoids an allocation and page
faults per message, and lets UCX's registration cache hit (what makes RDMA cheap).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

MIN_SIZE_CLASS = 4096


def size_class(nbytes: int) -> int:
    """Smallest power of two >= nbytes (at least 4 KiB). Untouched tail pages cost no RSS."""
    return max(MIN_SIZE_CLASS, 1 << max(0, nbytes - 1).bit_length())


class BufferPool:
    """Free lists of 1-D uint8 CPU tensors, one per power-of-two size class."""

    def __init__(self, max_pooled_bytes: int) -> None:
        self._max_pooled_bytes = max_pooled_bytes
        self._free: dict[int, list[torch.Tensor]] = {}
        self._free_ptrs: set[int] = set()
        self.num_pooled_bytes = 0
        self.num_allocated = 0
        self.num_reused = 0

    def acquire(self, nbytes: int) -> torch.Tensor:
        """A buffer of at least `nbytes` (its full size class); slice what you need."""
        size = size_class(nbytes)
        free = self._free.get(size)
        if free:
            buffer = free.pop()
            self._free_ptrs.discard(buffer.data_ptr())
            self.num_pooled_bytes -= size
            self.num_reused += 1
            return buffer
        self.num_allocated += 1
        return torch.empty(size, dtype=torch.uint8)

    def release(self, buffer: torch.Tensor) -> bool:
        """Return a buffer from `acquire`. False if it was not kept (pool full, not ours)."""
        size = buffer.numel()
        if buffer.dtype != torch.uint8 or buffer.dim() != 1 or size != size_class(size):
            return False
        if buffer.data_ptr() in self._free_ptrs:
            return False  # released twice; keeping it twice would hand it out twice
        if self.num_pooled_bytes + size > self._max_pooled_bytes:
            return False
        self._free.setdefault(size, []).append(buffer)
        self._free_ptrs.add(buffer.data_ptr())
        self.num_pooled_bytes += size
        return True

    def release_tensors(self, tensors: Sequence[torch.Tensor]) -> bool:
        """Recycle the buffer behind tensors returned by a receive without `into`.

        The caller promises not to touch any view of that buffer afterwards.
        """
        if not tensors:
            return False
        storage = tensors[0].untyped_storage()
        if any(t.untyped_storage().data_ptr() != storage.data_ptr() for t in tensors):
            raise ValueError("release() takes the tensors of one receive, not a mix")
        buffer = torch.empty(0, dtype=torch.uint8).set_(storage)
        return self.release(buffer)
