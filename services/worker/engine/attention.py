"""Attention over the paged KV cache, batch-invariant: a query's output is the same bits
whichever rows share its step, however its prompt was chunked, and whether it is a
decode, a prefill row or a recomputation after preemption.

Every layer first writes this step's K/V into their pool slots, then every query row
attends over the pool. Rows are grouped, and every group runs the same code (`attend`):

    decode group     all single-token rows; keys padded to the longest context
    prefill tiles    up to QUERY_TILE rows of one request's chunk; keys = its context

For a group of B sequences with t rows each (Q = t * G query heads per KV head, X = nkv * B):

    scores  (X, L, Q) = K (X, L, hd) @ Q^T      one bmm; + bias (0 / -inf) masks
    weights = exp(scores - row max)             elementwise; the max is exact
    per chunk c of KEY_CHUNK keys:              two bmms over X * n chunks
        partial_c = w_c^T (Q, C) @ V_c (C, hd)
        sum_c     = w_c^T (Q, C) @ ones (C, 2)
    out = pairwise(partial_c) / pairwise(sum_c)   fixed-order trees over the chunks

Why the result does not depend on the batch (measured on this machine's MKL; guarded
by tests/unit/worker/engine/test_attention.py and test_batch_invariance.py):
- A gemm element here depends only on its two input vectors and the contraction
  length, not on the other dimensions, the batch size or its place, as long as the
  query dimension has >= MIN_QUERY_COLUMNS entries (with fewer, MKL takes other
  paths that sum in other orders). The contractions are head_dim and KEY_CHUNK: fixed.
- Every other op is elementwise (exact, or exp, whose vectorised and scalar loops
  agree) or a max (exact in any order).
- The only sums over a number of terms that varies with the batch are the trees over
  chunks, and they give the same bits when zeros are appended: a row's padding chunks
  (keys past its context, masked to weight 0) change nothing. Padding to the longest
  context in the batch and padding to max_model_len / KEY_CHUNK chunks are the same.
"""

from __future__ import annotations

import array
import math
from dataclasses import dataclass

import torch

from services.worker.engine import native
from services.worker.engine.config import ModelConfig
from services.worker.engine.kv_cache import KVCache
from services.worker.engine.native import NativeRows
from services.worker.engine.staging import StepUploader

KEY_CHUNK = 64  # keys per partial: the contraction length of the weights @ values gemms
# Query heads x rows per gemm below which MKL takes other code paths (other summation
# orders): with one column a gemv; on AVX2 machines (AMD EPYC) small-N kernels up to 11
# columns, each summing in its own order. 16 covers every machine measured.
MIN_QUERY_COLUMNS = 16
QUERY_TILE = 128  # prefill rows attended at once: bounds the (keys x queries) score matrix


@dataclass
class AttentionGroup:
    """Rows attending in one pass: num_seqs sequences of num_rows query rows each,
    sequence b's rows at flat rows [start + b * num_rows, start + (b + 1) * num_rows)."""

    start: int
    num_seqs: int  # B
    num_rows: int  # t
    num_keys: int  # L: the longest context, padded to KEY_CHUNK and block_size multiples
    block_index: torch.Tensor  # (B * L / block_size,) int64 blocks holding the keys
    bias: torch.Tensor | None  # (B, L, t, cols) float32 causal_bias (None: not built yet)
    query_positions: torch.Tensor  # (B, t) int64: what the bias is built from
    columns: int  # cols: query_columns(num_queries_per_kv, t)


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # (T,) int64: block_id * block_size + offset of each row
    groups: list[AttentionGroup]  # kernels "torch"
    native: NativeRows | None = None  # kernels "native"


_TYPECODES = {torch.int64: "q", torch.int32: "i"}


def int_tensor(
    values: list[int], dtype: torch.dtype = torch.int64, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """torch.tensor(values, dtype=dtype, device=device), through an array.array buffer:
    torch.tensor converts a list element by element (~70 ns each), which for a step's
    metadata costs more than the step's small kernels."""
    if not values:
        return torch.empty(0, dtype=dtype, device=device)
    # The tensor shares the array's memory (and keeps it alive); the array is ours alone.
    return torch.frombuffer(array.array(_TYPECODES[dtype], values), dtype=dtype).to(device)


def query_columns(num_queries_per_kv: int, num_rows: int) -> int:
    """Query heads per KV head as laid out for the gemms (cols): padded with zero heads
    when a sequence's rows x heads would be fewer than MIN_QUERY_COLUMNS."""
    return max(num_queries_per_kv, -(-MIN_QUERY_COLUMNS // num_rows))


def causal_bias(query_positions: torch.Tensor, num_keys: int, columns: int) -> torch.Tensor:
    """(B, t) positions -> (B, L, t, cols) float32: 0 where the key's position is at most
    the row's, else -inf. Additive (masked_fill is slow on CPU) and in the scores' own
    layout, so masking is one plain pass."""
    key_positions = torch.arange(num_keys, device=query_positions.device)
    is_masked = key_positions[None, :, None] > query_positions[:, None, :]  # (B, L, t)
    bias = torch.where(is_masked, float("-inf"), 0.0)
    return bias[..., None].expand(-1, -1, -1, columns).contiguous()


def _build_group(
    start: int,
    query_positions: torch.Tensor,  # (B, t) int64, ascending within a sequence
    block_tables: list[list[int]],
    block_size: int,
    num_queries_per_kv: int,
    device: torch.device | str,
    with_bias: bool,
) -> AttentionGroup:
    num_seqs, num_rows = query_positions.shape
    unit = math.lcm(KEY_CHUNK, block_size)
    num_keys = -(-(int(query_positions.max()) + 1) // unit) * unit
    num_blocks = num_keys // block_size
    # Padding keys read block 0: any block holds finite values, and they are masked.
    table = [ids[:num_blocks] + [0] * (num_blocks - len(ids)) for ids in block_tables]
    columns = query_columns(num_queries_per_kv, num_rows)
    return AttentionGroup(
        start=start,
        num_seqs=num_seqs,
        num_rows=num_rows,
        num_keys=num_keys,
        block_index=torch.tensor(table, dtype=torch.long, device=device).view(-1),
        bias=causal_bias(query_positions, num_keys, columns).to(device) if with_bias else None,
        query_positions=query_positions,
        columns=columns,
    )


def build_attention_metadata(
    decodes: list[tuple[int, list[int]]],
    prefills: list[tuple[int, int, list[int]]],
    block_size: int,
    num_queries_per_kv: int,
    device: torch.device | str,
    kernels: str = "torch",
    with_bias: bool = True,
) -> AttentionMetadata:
    """decodes: (position, block_ids) per single-token row; prefills: (num_computed,
    num_tokens, block_ids) per chunk, rows following the decodes in this order.
    kernels: "torch" (groups) or "native" (NativeRows). with_bias=False leaves the
    groups' masks to upload_metadata (built on the device, from the positions)."""
    slots: list[int] = []
    for position, block_ids in decodes:
        slots.append(block_ids[position // block_size] * block_size + position % block_size)
    for num_computed, num_tokens, block_ids in prefills:
        slots += [
            block_ids[p // block_size] * block_size + p % block_size
            for p in range(num_computed, num_computed + num_tokens)
        ]
    slot_mapping = int_tensor(slots, torch.int64, device)
    if kernels == "native":
        return AttentionMetadata(slot_mapping, [], _native_rows(decodes, prefills, block_size))

    groups = []
    if decodes:
        positions = torch.tensor([[position] for position, _ in decodes], dtype=torch.long)
        block_tables = [block_ids for _, block_ids in decodes]
        groups.append(
            _build_group(
                0, positions, block_tables, block_size, num_queries_per_kv, device, with_bias
            )
        )
    row = len(decodes)
    for num_computed, num_tokens, block_ids in prefills:
        for tile_start in range(0, num_tokens, QUERY_TILE):
            tile_end = min(tile_start + QUERY_TILE, num_tokens)
            positions = torch.arange(num_computed + tile_start, num_computed + tile_end)[None]
            groups.append(
                _build_group(
                    row + tile_start,
                    positions,
                    [block_ids],
                    block_size,
                    num_queries_per_kv,
                    device,
                    with_bias,
                )
            )
        row += num_tokens
    return AttentionMetadata(slot_mapping, groups)


def upload_metadata(
    metadata: AttentionMetadata, uploader: StepUploader, extra: list[torch.Tensor]
) -> tuple[AttentionMetadata, list[torch.Tensor]]:
    """Host-built torch-kernel metadata (and `extra` host int64 tensors: the step's
    token ids, positions, ...) on the uploader's device, in one copy. Each group's mask
    is built there from its uploaded positions: no float tensor crosses the bus."""
    if metadata.native is not None:
        raise ValueError("the native kernels' metadata stays on the host (they run on the CPU)")
    host = [metadata.slot_mapping, *extra]
    for g in metadata.groups:
        host += [g.block_index, g.query_positions]
    on_device = uploader.upload(host)
    tables = on_device[1 + len(extra) :]
    groups = []
    for i, g in enumerate(metadata.groups):
        positions = tables[2 * i + 1]
        groups.append(
            AttentionGroup(
                start=g.start,
                num_seqs=g.num_seqs,
                num_rows=g.num_rows,
                num_keys=g.num_keys,
                block_index=tables[2 * i],
                bias=causal_bias(positions, g.num_keys, g.columns),
                query_positions=positions,
                columns=g.columns,
            )
        )
    return AttentionMetadata(on_device[0], groups), on_device[1 : 1 + len(extra)]


def _native_rows(
    decodes: list[tuple[int, list[int]]],
    prefills: list[tuple[int, int, list[int]]],
    block_size: int,
) -> NativeRows:
    row_seq: list[int] = list(range(len(decodes)))
    positions: list[int] = [position for position, _ in decodes]
    tables = [block_ids for _, block_ids in decodes]
    for num_computed, num_tokens, block_ids in prefills:
        row_seq += [len(tables)] * num_tokens
        positions += range(num_computed, num_computed + num_tokens)
        tables.append(block_ids)
    # A sequence needs blocks up to its last row's position only (its table may hold more).
    needed = [0] * len(tables)
    for seq, position in zip(row_seq, positions, strict=True):
        needed[seq] = position // block_size + 1
    width = max(needed)
    # One tensor, three views: building a tensor from a list costs more than its size.
    flat = row_seq + positions
    for ids, n in zip(tables, needed, strict=True):
        flat += ids[:n]
        flat += [0] * (width - n)
    values = int_tensor(flat, torch.int32)
    num_rows = len(row_seq)
    return NativeRows(
        row_seq=values[:num_rows],
        positions=values[num_rows : 2 * num_rows],
        block_tables=values[2 * num_rows :].view(len(tables), width),
    )


def _pairwise_sum_(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Sums x over dim, overwriting x, as a pairwise tree in a fixed order: entry i +=
    entry i + h for the largest power of two h below the length, then the same over the
    first h entries, down to one.

    This is the tree over x zero-padded to any power of two (more padding only adds
    levels of `+ 0`), so the result depends on the real entries alone, whereas
    torch.sum picks its order from the tensor's shape. Each level is one elementwise add.
    """
    length = x.shape[dim]
    while length > 1:
        half = 1 << ((length - 1).bit_length() - 1)
        x.narrow(dim, 0, length - half).add_(x.narrow(dim, half, length - half))
        x, length = x.narrow(dim, 0, half), half
    return x.squeeze(dim)


def _fold(num_keys: int, num_columns: int) -> int:
    """How many keys to fold into the inner dim (a power of two dividing num_keys) so
    that rows of the (X, L / k, k * Q) view hold about 64 elements: CPU reductions and
    broadcasts over a short inner dim are slow."""
    k = 1
    while k * num_columns < 64 and num_keys % (2 * k) == 0:
        k *= 2
    return k


def attend(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Batch-invariant attention of B sequences' query rows over their keys (float32).

    queries (B, t, nh, hd); keys, values (nkv, B, L, hd) contiguous with L a multiple of
    KEY_CHUNK; bias (B, L, t, cols) from causal_bias (a row never masks all its keys).
    Returns (B, t, nh, hd). Query head h reads KV head h // (nh / nkv), as in HF.
    """
    num_seqs, num_rows, num_heads, head_dim = queries.shape
    num_kv_heads, num_keys = keys.shape[0], keys.shape[2]
    group = num_heads // num_kv_heads
    columns = bias.shape[3]
    num_columns = num_rows * columns  # Q: the rows' query heads sharing a KV head
    batch = num_kv_heads * num_seqs  # X: one gemm per (KV head, sequence)
    num_chunks = num_keys // KEY_CHUNK  # n

    q = queries.new_empty(num_kv_heads, num_seqs, num_rows, columns, head_dim)
    if columns > group:
        q[:, :, :, group:].zero_()
    by_kv_head = queries.view(num_seqs, num_rows, num_kv_heads, group, head_dim)
    torch.mul(by_kv_head.permute(2, 0, 1, 3, 4), scale, out=q[:, :, :, :group])

    # (X, L, hd) @ (X, hd, Q) -> (X, L, Q); queries on the column axis (see the top).
    scores = torch.bmm(keys.view(batch, num_keys, head_dim), q.view(batch, -1, head_dim).mT)
    scores.view(num_kv_heads, -1).add_(bias.view(1, -1))
    # Shift by the row max and exponentiate. The max is repeated along k keys so that
    # the subtraction runs over long inner rows: (X, L / k, k * Q).
    k = _fold(num_keys, num_columns)
    folded = scores.view(batch, num_keys // k, k * num_columns)
    row_max = folded.amax(1).view(batch, k, num_columns).amax(1, keepdim=True)  # (X, 1, Q)
    row_max = row_max.expand(-1, k, -1).reshape(batch, 1, k * num_columns)
    weights = folded.sub_(row_max).exp_()

    # Per chunk of keys: (X * n, Q, C) @ (X * n, C, hd) -> (X * n, Q, hd), and the
    # chunk's weight sum by the same kind of gemm against two columns of ones (a single
    # column would be a gemv, summing in another order).
    chunked = weights.view(batch * num_chunks, KEY_CHUNK, num_columns).mT
    partials = torch.bmm(chunked, values.view(batch * num_chunks, KEY_CHUNK, head_dim))
    ones = weights.new_ones(1, KEY_CHUNK, 2).expand(batch * num_chunks, -1, -1)
    sums = torch.bmm(chunked, ones)[:, :, 0]  # (X * n, Q)

    out = _pairwise_sum_(partials.view(batch, num_chunks, num_columns, head_dim), 1)
    sums = _pairwise_sum_(sums.reshape(batch, num_chunks, num_columns), 1)
    out = out.div_(sums.unsqueeze(-1))  # (X, Q, hd)
    out = out.view(num_kv_heads, num_seqs, num_rows, columns, head_dim)[:, :, :, :group]
    return out.permute(1, 2, 0, 3, 4).reshape(num_seqs, num_rows, num_heads, head_dim)


class PagedAttention:
    """The model's attention function for one step (see model.AttentionFn)."""

    def __init__(self, config: ModelConfig, kv_cache: KVCache, metadata: AttentionMetadata) -> None:
        self.config = config
        self.kv_cache = kv_cache
        self.metadata = metadata
        self.scale = config.head_dim**-0.5

    def __call__(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        c, meta = self.config, self.metadata
        cache = self.kv_cache.layers[layer_idx]  # (2, nkv, NB, bs, hd)
        num_blocks, block_size = cache.shape[2], cache.shape[3]
        out = torch.empty(q.shape[0], c.q_size, dtype=q.dtype, device=q.device)
        if meta.native is not None:
            native.write_kv(k, v, meta.slot_mapping, cache)
            native.paged_attention(q, cache, meta.native, out, self.scale)
            return out
        flat = cache.view(2, c.num_kv_heads, num_blocks * block_size, c.head_dim)
        flat[0].index_copy_(1, meta.slot_mapping, k.transpose(0, 1))
        flat[1].index_copy_(1, meta.slot_mapping, v.transpose(0, 1))
        for g in meta.groups:
            # K and V in one gather, into a buffer reused by every group, layer and step:
            # (2, nkv, B * L / bs, bs, hd) -> (2, nkv, B, L, hd)
            gathered = self.kv_cache.workspace(
                (2, c.num_kv_heads, g.block_index.numel(), block_size, c.head_dim)
            )
            torch.index_select(cache, 2, g.block_index, out=gathered)
            gathered = gathered.view(2, c.num_kv_heads, g.num_seqs, g.num_keys, c.head_dim)
            gathered = gathered.float()  # a copy only for a 16-bit pool
            rows = slice(g.start, g.start + g.num_seqs * g.num_rows)
            queries = q[rows].view(g.num_seqs, g.num_rows, c.num_heads, c.head_dim).float()
            attn = attend(queries, gathered[0], gathered[1], g.bias, self.scale)
            out[rows] = attn.reshape(-1, c.q_size)
        return out
