"""Batch-invariant attention: a query row's output is the same bits in any batch, tile or
key padding, and it is attention (close to a float64 reference)."""

from __future__ import annotations

import pytest
import torch

from services.worker.engine.attention import (
    KEY_CHUNK,
    _pairwise_sum_,
    attend,
    causal_bias,
    query_columns,
)

MAX_CONTEXT = 300


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    previous = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(previous)


class Sequences:
    """Random per-position queries, keys and values for a few sequences: a position's
    vectors never change, so any two ways of attending to them must agree exactly."""

    def __init__(self, num_seqs: int, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        generator = torch.Generator().manual_seed(num_heads * 100 + num_kv_heads * 10 + head_dim)
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.queries = torch.randn(num_seqs, MAX_CONTEXT, num_heads, head_dim, generator=generator)
        self.keys = torch.randn(num_seqs, MAX_CONTEXT, num_kv_heads, head_dim, generator=generator)
        self.values = torch.randn(
            num_seqs, MAX_CONTEXT, num_kv_heads, head_dim, generator=generator
        )
        self.scale = head_dim**-0.5

    def attend(self, seq_ids: list[int], first: list[int], num_rows: int, num_keys: int):
        """Rows first[b] .. first[b] + num_rows - 1 of sequence seq_ids[b], together, over
        num_keys keys (past the context: garbage, masked). Returns (B, t, nh, hd)."""
        garbage = torch.Generator().manual_seed(num_keys)
        num_seqs = len(seq_ids)
        queries = torch.stack(
            [self.queries[s, f : f + num_rows] for s, f in zip(seq_ids, first, strict=True)]
        )
        keys = 100 * torch.randn(
            num_seqs, num_keys, self.num_kv_heads, self.head_dim, generator=garbage
        )
        values = 100 * torch.randn(keys.shape, generator=garbage)
        for b, (s, f) in enumerate(zip(seq_ids, first, strict=True)):
            context = f + num_rows
            keys[b, :context] = self.keys[s, :context]
            values[b, :context] = self.values[s, :context]
        positions = torch.tensor(first)[:, None] + torch.arange(num_rows)[None]
        group = self.num_heads // self.num_kv_heads
        bias = causal_bias(positions, num_keys, query_columns(group, num_rows))
        by_head = (keys.permute(2, 0, 1, 3).contiguous(), values.permute(2, 0, 1, 3).contiguous())
        return attend(queries, *by_head, bias, self.scale)

    def reference(self, seq_id: int, position: int) -> torch.Tensor:
        """(nh, hd) float64 softmax(q k^T * scale) v for one query."""
        group = self.num_heads // self.num_kv_heads
        q = self.queries[seq_id, position].double()  # (nh, hd)
        k = self.keys[seq_id, : position + 1].double().repeat_interleave(group, dim=1)
        v = self.values[seq_id, : position + 1].double().repeat_interleave(group, dim=1)
        weights = torch.softmax(torch.einsum("hd,lhd->hl", q, k) * self.scale, dim=-1)
        return torch.einsum("hl,lhd->hd", weights, v)


def padded(num_keys: int) -> int:
    return -(-num_keys // KEY_CHUNK) * KEY_CHUNK


# (heads, KV heads, head dim): the tiny model, the HF test models, multi-head, 8B-like,
# and one head (a decode alone is then a single-column gemm: without MIN_QUERY_COLUMNS
# padding, MKL's matrix-vector path sums in another order and this fails)
SHAPES = [(8, 2, 32), (8, 8, 8), (8, 4, 16), (4, 4, 64), (1, 1, 64), (16, 4, 128)]


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", SHAPES)
def test_a_row_gets_the_same_bits_however_it_is_batched(threads, num_heads, num_kv_heads, head_dim):
    seqs = Sequences(6, num_heads, num_kv_heads, head_dim)
    for position in (0, 63, 64, 200, 299):
        # Alone, as a decode: the reference bits.
        alone = seqs.attend([0], [position], 1, padded(position + 1))[0, 0]
        torch.testing.assert_close(
            alone.double(), seqs.reference(0, position), atol=1e-5, rtol=1e-5
        )
        ways = {
            # in a decode batch beside longer and shorter contexts (keys padded further)
            "decode batch": seqs.attend([3, 0, 5, 1], [299, position, 7, 150], 1, padded(300))[
                1, 0
            ],
            # keys padded to the whole context limit (2048)
            "padded to 2048": seqs.attend([0], [position], 1, 2048)[0, 0],
        }
        # as a prefill row, in tiles of several sizes starting at several places
        for num_rows in (1, 2, 5, 64, 128):
            for first in {max(0, position - num_rows + 1), max(0, position - num_rows // 2)}:
                if first + num_rows > MAX_CONTEXT or not first <= position < first + num_rows:
                    continue
                tile = seqs.attend([0], [first], num_rows, padded(first + num_rows))
                ways[f"prefill rows {first}..{first + num_rows - 1}"] = tile[0, position - first]
        for way, got in ways.items():
            assert torch.equal(got, alone), f"position {position}: {way}"


def test_pairwise_sum_is_a_fixed_tree_and_ignores_zero_padding():
    generator = torch.Generator().manual_seed(0)
    for length in (1, 2, 3, 5, 8, 13, 33):
        x = torch.randn(3, length, 7, generator=generator)
        entries = [x[:, i] for i in range(length)]  # the tree over zero padding to 64
        entries += [torch.zeros_like(entries[0])] * (64 - length)
        while len(entries) > 1:
            half = len(entries) // 2
            entries = [entries[i] + entries[i + half] for i in range(half)]
        for pad in (0, 1, 64 - length):
            padded_x = torch.cat([x, torch.zeros(3, pad, 7)], dim=1)
            assert torch.equal(_pairwise_sum_(padded_x, 1), entries[0]), (length, pad)


def test_query_columns_pad_to_min_query_columns():
    assert query_columns(4, 1) == 16  # tiny model decode: 4 heads per KV head, 12 zero heads
    assert query_columns(1, 1) == 16  # multi-head attention decode
    assert query_columns(4, 2) == 8  # two prefill rows: 2 x 8 columns
    assert query_columns(1, 7) == 3  # 7 rows x 3 columns = 21 >= 16
    assert query_columns(32, 1) == 32  # enough heads: no padding
