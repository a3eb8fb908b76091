"""The KV pool: one tensor per held layer, addressed by block id.

    layers[i]: (2, num_kv_heads, num_blocks, block_size, head_dim)   [0] = K, [1] = V

Per-layer storage lets a stage that keeps only layers [start, end) (KunServe) hold KV
for those layers alone, and turn the bytes of dropped layers into more blocks. Heads
come before blocks so that gathering a block table gives each KV head's keys as one
contiguous (tokens, head_dim) matrix, ready for attention's batched gemms. Blocks
leave and enter the pool (read_blocks / write_blocks: migration) as
(2, blocks, block_size, num_kv_heads, head_dim) per layer, token-major. On a GPU they
leave and enter device memory through `staging` (pinned buffers, overlapped chunk
copies: staging.py); on the CPU `staging` is None and they are plain copies.
The pool is zero-filled: padded attention reads of never-written slots must see finite
values (they are masked out, and 0 * NaN would not be 0).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from services.worker.engine.config import DTYPE_NBYTES, ModelConfig
from services.worker.engine.dtypes import TORCH_DTYPES
from services.worker.engine.staging import KVStaging, device_staging, is_cuda


def kv_block_nbytes(config: ModelConfig, num_layers: int, block_size: int, dtype: str) -> int:
    """Bytes one block takes over num_layers layers (K and V)."""
    return num_layers * block_size * 2 * config.kv_size * DTYPE_NBYTES[dtype]


class KVCache:
    def __init__(
        self,
        config: ModelConfig,
        layer_start: int,
        layer_end: int,
        num_blocks: int,
        block_size: int,
        dtype: str,
        device: str,
    ) -> None:
        self.config = config
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.dtype = dtype
        self.device = device
        self._workspace = torch.empty(0, dtype=TORCH_DTYPES[dtype], device=device)
        # Host <-> device copies of blocks (None on the CPU; a test may set one there to
        # run the staged path).
        self.staging: KVStaging | None = device_staging(device) if is_cuda(device) else None
        self.layers: dict[int, torch.Tensor] = {
            i: self._empty(num_blocks) for i in range(layer_start, layer_end)
        }

    def _empty(self, num_blocks: int) -> torch.Tensor:
        c = self.config
        shape = (2, c.num_kv_heads, num_blocks, self.block_size, c.head_dim)
        return torch.zeros(shape, dtype=TORCH_DTYPES[self.dtype], device=self.device)

    def workspace(self, shape: tuple[int, ...]) -> torch.Tensor:
        """A scratch tensor of this shape for gathers, reused (grown as needed) across
        layers and steps: allocating megabytes per layer per step costs page faults."""
        numel = 1
        for size in shape:
            numel *= size
        if self._workspace.numel() < numel:
            self._workspace = torch.empty(numel, dtype=self._workspace.dtype, device=self.device)
        return self._workspace[:numel].view(shape)

    @property
    def layer_start(self) -> int:
        return min(self.layers)

    @property
    def layer_end(self) -> int:
        return max(self.layers) + 1

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.layers.values())

    def block_shape(self, num_blocks: int, num_layers: int | None = None) -> tuple[int, ...]:
        """Shape of read_blocks' result: (layers, 2, blocks, block_size, nkv, hd)."""
        c = self.config
        num_layers = len(self.layers) if num_layers is None else num_layers
        return (num_layers, 2, num_blocks, self.block_size, c.num_kv_heads, c.head_dim)

    # ---- block contents (migration, KV exchange) ------------------------------------

    def read_blocks(
        self,
        block_ids: list[int],
        layer_start: int | None = None,
        layer_end: int | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """A contiguous copy (layers, 2, len(block_ids), block_size, nkv, hd) of the given
        blocks for layers [layer_start, layer_end) (default: all held), in that order;
        into `out` (that shape, contiguous) when given, so a caller can reuse buffers.
        A host `out` of a pool with `staging` is filled through it (a device copy first)."""
        layer_ids = self._layer_range(layer_start, layer_end)
        shape = self.block_shape(len(block_ids), len(layer_ids))
        if out is not None and (tuple(out.shape) != shape or not out.is_contiguous()):
            raise ValueError(f"out has shape {tuple(out.shape)}, expected contiguous {shape}")
        if self.staging is not None and out is not None and out.device.type == "cpu":
            on_device = self.read_blocks(block_ids, layer_start, layer_end)
            return self.staging.to_host(on_device, out)
        index = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        if out is None:
            out = torch.empty(shape, dtype=TORCH_DTYPES[self.dtype], device=self.device)
        # Gather head-major into a contiguous scratch, then transpose in one strided copy:
        # index_select straight into a permuted view is several times slower.
        by_head = torch.empty(
            (2, self.config.num_kv_heads, len(block_ids), self.block_size, self.config.head_dim),
            dtype=out.dtype,
            device=self.device,
        )
        for layer_out, i in zip(out, layer_ids, strict=True):
            torch.index_select(self.layers[i], 2, index, out=by_head)
            layer_out.copy_(by_head.permute(0, 2, 3, 1, 4))  # (2, n, bs, nkv, hd)
        return out

    def write_blocks(
        self, block_ids: list[int], data: torch.Tensor, layer_start: int | None = None
    ) -> None:
        """Writes read_blocks-shaped data into the given blocks, layers from layer_start on."""
        layer_start = self.layer_start if layer_start is None else layer_start
        layer_ids = self._layer_range(layer_start, layer_start + data.shape[0])
        expected = self.block_shape(len(block_ids), len(layer_ids))
        if tuple(data.shape) != expected:
            raise ValueError(f"KV data has shape {tuple(data.shape)}, expected {expected}")
        if self.staging is not None and data.device.type == "cpu":
            data = self.staging.copy_to_device(data.contiguous())
        index = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        for layer_data, i in zip(data, layer_ids, strict=True):
            by_head = layer_data.permute(0, 3, 1, 2, 4)  # (2, nkv, n, bs, hd)
            self.layers[i].index_copy_(2, index, by_head.to(self.layers[i].dtype))

    def _layer_range(self, layer_start: int | None, layer_end: int | None) -> range:
        layer_start = self.layer_start if layer_start is None else layer_start
        layer_end = self.layer_end if layer_end is None else layer_end
        if not self.layer_start <= layer_start < layer_end <= self.layer_end:
            raise ValueError(
                f"layers [{layer_start}, {layer_end}) are not all held; the pool holds "
                f"[{self.layer_start}, {self.layer_end})"
            )
        return range(layer_start, layer_end)

    # ---- pool shape changes (KunServe drop / restore) -------------------------------

    def drop_layers(self, keep_start: int, keep_end: int) -> None:
        """Frees the KV slices of every layer outside [keep_start, keep_end)."""
        for i in [i for i in self.layers if not keep_start <= i < keep_end]:
            del self.layers[i]

    def resize(self, num_blocks: int, moves: dict[int, int] | None = None) -> None:
        """Re-allocates every layer with num_blocks blocks, keeping block contents.

        moves {old id: new id} relocates blocks beyond a shrunken pool first. Layers
        are re-allocated one at a time, so the peak overhead is one layer's slice.
        """
        if num_blocks == self.num_blocks and not moves:
            return
        if moves:
            src = torch.tensor(list(moves), dtype=torch.long, device=self.device)
            dst = torch.tensor(list(moves.values()), dtype=torch.long, device=self.device)
            for tensor in self.layers.values():
                tensor.index_copy_(2, dst, tensor.index_select(2, src))
        keep = min(num_blocks, self.num_blocks)
        for i in list(self.layers):
            new = self._empty(num_blocks)
            new[:, :, :keep] = self.layers[i][:, :, :keep]
            self.layers[i] = new
        self.num_blocks = num_blocks

    def remap(self, num_blocks: int, moves: Mapping[int, int]) -> None:
        """Re-allocates every held layer with num_blocks blocks: block `old` of the old
        pool becomes block moves[old] of the new one, every other block is zero (KunServe:
        join a group at a block offset, leave it with new local ids).

            join     old [0 ...... N)           group [.. offset ...... offset+N ..)
            leave    group {g1, g2, ...}   ->   local {moves[g1], moves[g2], ...}

        Layers are re-allocated one at a time, so the peak overhead is one layer's slice
        (plus a copy of the moved rows when they are not one contiguous run)."""
        src, dst = list(moves), list(moves.values())
        run = _contiguous_run(src, dst)
        src_index = torch.tensor(src, dtype=torch.long, device=self.device)
        dst_index = torch.tensor(dst, dtype=torch.long, device=self.device)
        for i in list(self.layers):
            old = self.layers[i]
            new = self._empty(num_blocks)
            if run is not None:
                src_start, dst_start, n = run
                new[:, :, dst_start : dst_start + n] = old[:, :, src_start : src_start + n]
            elif src:
                new.index_copy_(2, dst_index, old.index_select(2, src_index))
            self.layers[i] = new
            del old  # before the next layer's allocation: one old slice alive at a time
        self.num_blocks = num_blocks

    def add_layers(self, layer_start: int, layer_end: int) -> None:
        """Allocates (zeroed) slices for layers [layer_start, layer_end) not held yet."""
        for i in range(layer_start, layer_end):
            if i not in self.layers:
                self.layers[i] = self._empty(self.num_blocks)


def _contiguous_run(src: list[int], dst: list[int]) -> tuple[int, int, int] | None:
    """(src_start, dst_start, n) if src and dst are both runs of consecutive ids."""
    n = len(src)
    if n == 0 or src != list(range(src[0], src[0] + n)) or dst != list(range(dst[0], dst[0] + n)):
        return None
    return src[0], dst[0], n
