"""Reusable staging buffers for stage transfers.

Each stage moves its blocks in transfers of at most `chunk_bytes`, through a buffer read
from (source) or received into (destination). A fresh buffer per transfer costs a page
fault per 4 KiB on first touch, which for a long context is most of the copy (measured
on the CI machine: reading 256 MiB of blocks into a new tensor 0.3-1.5 s, into a reused
one 0.07 s). So buffers of exactly chunk_bytes are kept and handed out again.

A buffer whose transfer failed or was cancelled is not given back: the data plane may
still write into it, so it is left to the garbage collector once nothing references it.
"""

from __future__ import annotations

import math
import threading

import torch

from kvtransport.tensors import huge_page_empty


class StagingBuffers:
    def __init__(self, chunk_bytes: int, max_free: int = 2) -> None:
        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes={chunk_bytes} must be >= 1")
        self.chunk_bytes = chunk_bytes
        self._max_free = max_free
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()  # the source reads into buffers on worker threads

    @property
    def num_free(self) -> int:
        return len(self._free)

    def acquire(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A contiguous tensor of this shape; its contents are whatever was there. A new
        buffer's pages are faulted in here (huge-page faults can compact memory for
        milliseconds): call it off the event loop."""
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > self.chunk_bytes:  # larger than any pooled buffer: a one-off
            return torch.empty(shape, dtype=dtype)
        with self._lock:
            flat = self._free.pop() if self._free else None
        if flat is None:  # huge pages: UCX's CMA copies of them run faster
            flat = huge_page_empty(self.chunk_bytes)
            flat.fill_(0)  # fault its pages in here, not inside a data-plane copy
        return flat[:nbytes].view(dtype).view(shape)

    def release(self, tensor: torch.Tensor) -> None:
        """Give back a tensor from acquire, once its transfer has completed."""
        storage = tensor.untyped_storage()
        if storage.nbytes() != self.chunk_bytes:
            return  # a one-off
        flat = torch.empty(0, dtype=torch.uint8).set_(storage)
        with self._lock:
            if len(self._free) < self._max_free and all(
                f.data_ptr() != flat.data_ptr() for f in self._free
            ):
                self._free.append(flat)
