"""Tensors between host memory and the engine's device (a CUDA GPU, or the CPU itself).

Two jobs, one idea: a host buffer sized once and reused, pinned when the device is
CUDA so that copies to and from it are DMA transfers that do not block the host.

    StepUploader   a step's integer inputs (token ids, positions, slot mappings, block
                   tables): packed on the host into one int64 buffer, copied to the
                   device in one non-blocking copy; an event guards the buffer's reuse
    KVStaging      KV blocks, activations and weights leaving or entering device memory:
                   chunk by chunk through two pinned buffers, each chunk's copy on a side
                   stream overlapping the previous chunk's host copy

On the CPU both still run their whole code (a plain buffer, a plain copy, no stream):
the tests drive the same staging with device "cpu" that a GPU runs with "cuda". The
CUDA-only lines are the few under `if self._cuda`.

Why not let every call do `tensor.to(device)`: a copy from pageable host memory is
synchronous (the host waits for the GPU to drain its queue), so one per input per step
would serialise the host's Python with the GPU's kernels; and a fresh pinned buffer per
transfer costs a page-locking system call per transfer.
"""

from __future__ import annotations

import threading

import torch


def is_cuda(device: torch.device | str) -> bool:
    return torch.device(device).type == "cuda"


def device_kind(device: torch.device | str) -> str:
    """What a migration's peers compare: "cpu", or "cuda:" and the GPU's name (its
    kernels round like another GPU's of the same model only)."""
    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    return f"cuda:{torch.cuda.get_device_name(device)}"


def _host_empty(numel: int, dtype: torch.dtype, pinned: bool) -> torch.Tensor:
    return torch.empty(numel, dtype=dtype, pin_memory=pinned)


class StepUploader:
    """Uploads a step's int64 host tensors to the device in one copy.

    `upload(tensors)` returns device tensors of the same shapes, in order, each a view of
    one device buffer. The host buffer is pinned (CUDA) and reused across steps: before
    it is overwritten, the event recorded after the previous step's copy is waited on
    (in practice already complete: the step after it sampled, which synchronises).
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self._cuda = is_cuda(self.device)
        self._host = _host_empty(0, torch.int64, self._cuda)
        self._copied = None  # torch.cuda.Event of the last copy out of _host

    def upload(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        sizes = [t.numel() for t in tensors]
        total = sum(sizes)
        if self._copied is not None:
            self._copied.synchronize()  # the previous copy has read the buffer
        if self._host.numel() < total:  # grows to the largest step seen, then stays
            self._host = _host_empty(max(total, 2 * self._host.numel()), torch.int64, self._cuda)
        offset = 0
        for t, n in zip(tensors, sizes, strict=True):
            self._host[offset : offset + n].copy_(t.reshape(-1))
            offset += n
        flat = torch.empty(total, dtype=torch.int64, device=self.device)
        flat.copy_(self._host[:total], non_blocking=self._cuda)
        if self._cuda:
            self._copied = torch.cuda.Event()
            self._copied.record(torch.cuda.current_stream(self.device))
        out, offset = [], 0
        for t, n in zip(tensors, sizes, strict=True):
            out.append(flat[offset : offset + n].view(t.shape))
            offset += n
        return out


class KVStaging:
    """Moves tensors between the device and host memory the data plane can read or write.

    `to_host(src, out)`: device tensor -> `out` (a contiguous host tensor, e.g. a data
    plane receive buffer or a pooled send buffer); `from_host(src, out)`: host tensor ->
    `out` (contiguous, on the device). Both copy in chunks of `chunk_bytes` through two
    pinned buffers (CUDA): chunk k's device copy runs on a side stream while the host
    copies chunk k - 1 between the pinned buffer and `out` / `src`, and an event per
    buffer says when its device copy is done. When `out` / `src` is itself pinned the
    copy goes straight through it in one non-blocking copy. They return when every byte
    is in place: the caller may send `out` or free `src` at once.

    On the CPU (device "cpu") the same loop runs with plain buffers and no stream, so
    the chunking, offsets and dtypes are tested here. Not thread-safe: one copy at a
    time per KVStaging (the worker gives each thread that copies its own, or a lock).
    """

    def __init__(self, device: torch.device | str, chunk_bytes: int = 8 << 20) -> None:
        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes={chunk_bytes} must be >= 1")
        self.device = torch.device(device)
        self.chunk_bytes = chunk_bytes
        self._cuda = is_cuda(self.device)
        self._buffers: list[torch.Tensor] = []  # two pinned byte buffers, made on first use
        self._stream = torch.cuda.Stream(self.device) if self._cuda else None
        self._lock = threading.Lock()  # migration threads and the engine's thread share one

    def copy_to_host(self, src: torch.Tensor) -> torch.Tensor:
        """A new host tensor holding `src` (nobody else writes it: the data plane may send
        it while the engine reuses its own buffers)."""
        if src.device.type == "cpu":
            return src.clone()
        return self.to_host(src, torch.empty(src.shape, dtype=src.dtype))

    def copy_to_device(self, src: torch.Tensor) -> torch.Tensor:
        """A new device tensor holding the host tensor `src`."""
        out = torch.empty(src.shape, dtype=src.dtype, device=self.device)
        return self.from_host(src, out)

    def _pair(self) -> list[torch.Tensor]:
        if not self._buffers:
            self._buffers = [_host_empty(self.chunk_bytes, torch.uint8, self._cuda) for _ in "ab"]
        return self._buffers

    def to_host(self, src: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        _check_pair(src, out, "out")
        src = src.contiguous()
        with self._lock:
            if self._cuda and out.is_pinned():
                return self._direct(out, src)
            self._chunked(_bytes(src), _bytes(out), device_to_host=True)
        return out

    def from_host(self, src: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        _check_pair(src, out, "src")
        if not out.is_contiguous():
            raise ValueError("out must be contiguous to be staged into")
        with self._lock:
            if self._cuda and src.is_pinned():
                return self._direct(out, src)
            self._chunked(_bytes(src), _bytes(out), device_to_host=False)
        return out

    def _direct(self, out: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        stream = self._stream
        stream.wait_stream(torch.cuda.current_stream(self.device))  # src/out written first
        with torch.cuda.stream(stream):
            out.copy_(src, non_blocking=True)
        stream.synchronize()
        return out

    def _chunked(self, src: torch.Tensor, dst: torch.Tensor, device_to_host: bool) -> None:
        """Byte tensors src -> dst, one on the device and one on the host, in chunks."""
        nbytes, step = src.numel(), self.chunk_bytes
        buffers = self._pair()
        events: list = [None, None]
        pending: tuple[int, int, int] | None = None  # (buffer, start, end) awaiting its host copy
        if self._cuda:  # the side stream sees every write the engine queued before
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
        for k, start in enumerate(range(0, nbytes, step)):
            end, b = min(start + step, nbytes), k % 2
            if events[b] is not None:
                events[b].synchronize()  # this buffer's previous device copy is done
            if device_to_host:
                self._device_copy(buffers[b][: end - start], src[start:end], events, b)
                if pending is not None:  # overlaps the copy just queued
                    self._drain(pending, buffers, dst, events)
                pending = (b, start, end)
            else:
                buffers[b][: end - start].copy_(src[start:end])  # host side first
                self._device_copy(dst[start:end], buffers[b][: end - start], events, b)
        if pending is not None:
            self._drain(pending, buffers, dst, events)
        for event in events:
            if event is not None:
                event.synchronize()

    @staticmethod
    def _drain(pending: tuple[int, int, int], buffers, dst: torch.Tensor, events: list) -> None:
        """Host copy of a chunk the device copied into a pinned buffer, once it is there."""
        b, start, end = pending
        if events[b] is not None:
            events[b].synchronize()
        dst[start:end].copy_(buffers[b][: end - start])

    def _device_copy(self, dst: torch.Tensor, src: torch.Tensor, events: list, b: int) -> None:
        if not self._cuda:
            dst.copy_(src)
            return
        with torch.cuda.stream(self._stream):
            dst.copy_(src, non_blocking=True)
            events[b] = torch.cuda.Event()
            events[b].record(self._stream)


def _check_pair(src: torch.Tensor, out: torch.Tensor, host_name: str) -> None:
    if src.dtype != out.dtype or src.shape != out.shape:
        raise ValueError(
            f"staging copies {tuple(src.shape)} {src.dtype} into {tuple(out.shape)} "
            f"{out.dtype}: shapes and dtypes must match"
        )
    host = out if host_name == "out" else src
    if host.device.type != "cpu" or not host.is_contiguous():
        raise ValueError(f"{host_name} must be a contiguous host tensor")


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor (any dtype, bf16 included)."""
    return t.reshape(-1).view(torch.uint8) if t.numel() else t.new_empty(0, dtype=torch.uint8)


_SHARED: dict[torch.device, KVStaging] = {}
_SHARED_LOCK = threading.Lock()


def device_staging(device: torch.device | str) -> KVStaging:
    """The process's KVStaging for a device (one pair of pinned buffers per device: KV
    caches, activations and weights of every engine on it share them)."""
    device = torch.device(device)
    with _SHARED_LOCK:
        if device not in _SHARED:
            _SHARED[device] = KVStaging(device)
        return _SHARED[device]
