"""Attention over the paged KV cache.

The executor lays the batch out as [single-token chunks | multi-token chunks]:

    rows  0 .. D-1          one token each (decodes): batched into one padded SDPA call
    rows  D .. T-1          prefill chunks, one SDPA call each (few per step)

For every layer: write this step's K/V into the slots of the pool, then attend. Decode
rows gather their block tables into a padded (D, nkv, S, hd) K/V and put the query
heads sharing a KV head on SDPA's query-length axis, so grouped-query attention needs
no KV copies: q (D, nkv, G, hd) x k (D, nkv, S, hd).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from services.worker.engine.config import ModelConfig
from services.worker.engine.kv_cache import KVCache


@dataclass
class PrefillSegment:
    start: int  # first row in the flat batch
    num_tokens: int
    num_computed_tokens: int  # context already in the cache before this chunk
    block_index: torch.Tensor | None  # (num_blocks,) blocks holding the context, if any
    mask: torch.Tensor | None  # (num_tokens, context) bool causal mask, if any context


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # (T,) int64: block_id * block_size + offset of each row
    num_decode: int  # D
    decode_block_index: torch.Tensor | None  # (D * max_blocks,) padded block tables, flattened
    # (D, 1, 1, max_blocks * block_size) additive: 0 where the key is in context, else -inf
    decode_mask: torch.Tensor | None
    prefills: list[PrefillSegment]


def build_attention_metadata(
    decodes: list[tuple[int, list[int]]],
    prefills: list[tuple[int, int, list[int]]],
    block_size: int,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
) -> AttentionMetadata:
    """decodes: (position, block_ids) per single-token row; prefills: (num_computed,
    num_tokens, block_ids) per chunk, rows following the decodes in this order."""
    slots: list[int] = []
    for position, block_ids in decodes:
        slots.append(block_ids[position // block_size] * block_size + position % block_size)
    for num_computed, num_tokens, block_ids in prefills:
        slots += [
            block_ids[p // block_size] * block_size + p % block_size
            for p in range(num_computed, num_computed + num_tokens)
        ]

    decode_block_index = decode_mask = None
    if decodes:
        max_blocks = max(position // block_size + 1 for position, _ in decodes)
        table = [
            block_ids[:max_blocks] + [0] * (max_blocks - len(block_ids)) for _, block_ids in decodes
        ]
        decode_block_index = torch.tensor(table, dtype=torch.long).view(-1).to(device)
        context_lens = torch.tensor([position + 1 for position, _ in decodes], device=device)
        key_positions = torch.arange(max_blocks * block_size, device=device)
        is_padding = key_positions[None, :] >= context_lens[:, None]  # (D, S)
        # Additive, built once per step: SDPA would convert a bool mask in every layer.
        decode_mask = torch.zeros(is_padding.shape, dtype=dtype, device=device)
        decode_mask = decode_mask.masked_fill_(is_padding, float("-inf"))[:, None, None, :]

    segments, row = [], len(decodes)
    for num_computed, num_tokens, block_ids in prefills:
        block_index = mask = None
        if num_computed > 0:
            context = num_computed + num_tokens
            num_blocks = -(-context // block_size)
            block_index = torch.tensor(block_ids[:num_blocks], dtype=torch.long, device=device)
            query_positions = torch.arange(num_computed, context, device=device)
            mask = torch.arange(context, device=device)[None, :] <= query_positions[:, None]
        segments.append(PrefillSegment(row, num_tokens, num_computed, block_index, mask))
        row += num_tokens
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
        num_decode=len(decodes),
        decode_block_index=decode_block_index,
        decode_mask=decode_mask,
        prefills=segments,
    )


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
        cache = self.kv_cache.layers[layer_idx]  # (2, NB, bs, nkv, hd)
        num_blocks, block_size = cache.shape[1], cache.shape[2]
        flat = cache.view(2, num_blocks * block_size, c.num_kv_heads, c.head_dim)
        flat[0].index_copy_(0, meta.slot_mapping, k)
        flat[1].index_copy_(0, meta.slot_mapping, v)

        num_decode = meta.num_decode
        decode_out = None
        if num_decode:
            assert meta.decode_block_index is not None
            num_gathered = meta.decode_block_index.numel()
            context = num_gathered // num_decode * block_size
            # K and V in one gather, into a buffer reused by every layer and step:
            # (2, D * MB, bs, nkv, hd) -> (2, D, S, nkv, hd)
            gathered = self.kv_cache.workspace((2, num_gathered, *cache.shape[2:]))
            torch.index_select(cache, 1, meta.decode_block_index, out=gathered)
            gathered = gathered.view(2, num_decode, context, c.num_kv_heads, c.head_dim)
            keys = gathered[0].transpose(1, 2)  # (D, nkv, S, hd)
            values = gathered[1].transpose(1, 2)
            queries = q[:num_decode].reshape(
                num_decode, c.num_kv_heads, c.num_queries_per_kv, c.head_dim
            )  # (D, nkv, G, hd)
            attn = F.scaled_dot_product_attention(
                queries, keys, values, attn_mask=meta.decode_mask, scale=self.scale
            )
            decode_out = attn.reshape(num_decode, c.q_size)  # (D, nkv, G, hd) -> (D, nh * hd)
            if not meta.prefills:
                return decode_out

        out = torch.empty(q.shape[0], c.q_size, dtype=q.dtype, device=q.device)
        if decode_out is not None:
            out[:num_decode] = decode_out
        for seg in meta.prefills:
            rows = slice(seg.start, seg.start + seg.num_tokens)
            queries = q[rows].transpose(0, 1)[None]  # (1, nh, t, hd)
            if seg.block_index is None:  # no earlier context: this chunk's own K/V, causal
                keys = k[rows].transpose(0, 1)[None]  # (1, nkv, t, hd)
                values = v[rows].transpose(0, 1)[None]
            else:
                context = seg.num_computed_tokens + seg.num_tokens
                # (2, blocks, bs, nkv, hd) -> (2, ctx, nkv, hd)
                gathered = cache.index_select(1, seg.block_index).flatten(1, 2)[:, :context]
                keys = gathered[0].transpose(0, 1)[None]  # (1, nkv, ctx, hd)
                values = gathered[1].transpose(0, 1)[None]
            attn = F.scaled_dot_product_attention(
                queries,
                keys,
                values,
                attn_mask=seg.mask,
                is_causal=seg.mask is None,
                scale=self.scale,
                enable_gqa=True,
            )  # (1, nh, t, hd)
            out[rows] = attn[0].transpose(0, 1).reshape(seg.num_tokens, c.q_size)
        return out
