"""The native paged-attention kernel: it is attention (close to a float64 reference), a
row's output is the same bits however the rows are batched, tiled or threaded, and the
engine falls back to the torch backend (or says why not) when the kernel cannot serve."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from services.worker.engine import EngineConfig, LLMEngine, kernels
from services.worker.engine.attention import (
    NativeRows,
    native_backend_unavailable,
    native_paged_attention,
)
from services.worker.engine.tiny import TINY_MODEL_CONFIG

# Contexts on both sides of the kernel's 64-key chunks and 8-key score groups.
LENGTHS = [1, 7, 8, 9, 63, 64, 65, 129, 200]


class Pool:
    """Random K/V for a few sequences in a shuffled paged pool, and every row's query."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int):
        generator = torch.Generator().manual_seed(num_heads * 1000 + head_dim * 10 + block_size)
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.block_size = block_size
        blocks_per_seq = [-(-n // block_size) for n in LENGTHS]
        num_blocks = sum(blocks_per_seq) + 3
        self.cache = torch.randn(
            2, num_kv_heads, num_blocks, block_size, head_dim, generator=generator
        )
        order = torch.randperm(num_blocks, generator=generator).tolist()
        self.tables: list[list[int]] = []
        for n in blocks_per_seq:
            self.tables.append(order[:n])
            order = order[n:]
        # Rows of every sequence, every position: (sequence, position, query).
        self.rows = [(s, p) for s, n in enumerate(LENGTHS) for p in range(n)]
        self.queries = torch.randn(len(self.rows), num_heads, head_dim, generator=generator)

    def run(self, row_ids: list[int], threads: int = 1) -> torch.Tensor:
        """Rows row_ids (a sequence's rows adjacent, ascending) in one call -> (R, nh*hd)."""
        seqs = list(dict.fromkeys(self.rows[r][0] for r in row_ids))
        width = max(len(self.tables[s]) for s in seqs)
        native = NativeRows(
            row_seq=torch.tensor([seqs.index(self.rows[r][0]) for r in row_ids], dtype=torch.int32),
            positions=torch.tensor([self.rows[r][1] for r in row_ids], dtype=torch.int32),
            block_tables=torch.tensor(
                [self.tables[s] + [0] * (width - len(self.tables[s])) for s in seqs],
                dtype=torch.int32,
            ),
        )
        out = torch.full((len(row_ids), self.num_heads * self.head_dim), float("nan"))
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            native_paged_attention(
                self.queries[row_ids], self.cache, native, out, self.head_dim**-0.5
            )
        finally:
            torch.set_num_threads(previous)
        return out

    def reference(self, row_id: int) -> torch.Tensor:
        """float64 softmax attention of one row over its keys, (nh * hd,)."""
        seq, position = self.rows[row_id]
        slots = [
            self.tables[seq][p // self.block_size] * self.block_size + p % self.block_size
            for p in range(position + 1)
        ]
        flat = self.cache.view(2, self.num_kv_heads, -1, self.head_dim).double()
        group = self.num_heads // self.num_kv_heads
        out = []
        for h in range(self.num_heads):
            keys, values = flat[0, h // group, slots], flat[1, h // group, slots]
            scores = keys @ self.queries[row_id, h].double() * self.head_dim**-0.5
            out.append(torch.softmax(scores, 0) @ values)
        return torch.cat(out)


@pytest.mark.parametrize(
    ("num_heads", "num_kv_heads", "head_dim", "block_size"),
    [
        (8, 2, 32, 16),  # the tiny model: 4 query heads per KV head
        (6, 2, 64, 5),  # 3 per KV head (accumulators 2 + 1); blocks cut 8-key groups
        (4, 4, 40, 16),  # head_dim not a multiple of 32; no GQA
        (16, 1, 128, 7),  # 16 per KV head
    ],
)
def test_a_row_gets_the_same_bits_however_it_is_batched(
    num_heads, num_kv_heads, head_dim, block_size
):
    pool = Pool(num_heads, num_kv_heads, head_dim, block_size)
    every_row = list(range(len(pool.rows)))
    together = pool.run(every_row, threads=2)  # prefill-like: tiles of 8 rows

    for r in every_row[::9]:
        expected = pool.reference(r)
        torch.testing.assert_close(together[r].double(), expected, rtol=1e-5, atol=1e-5)
    # Alone, one thread (a decode row): bit for bit.
    for r in every_row[::5]:
        assert torch.equal(pool.run([r])[0], together[r]), f"row {pool.rows[r]} alone"
    # Decode-like batch: the last row of each sequence, then every third row (other
    # tile boundaries), with one and two threads.
    last_rows = [sum(LENGTHS[: s + 1]) - 1 for s in range(len(LENGTHS))]
    for rows in (last_rows, every_row[1::3]):
        for threads in (1, 2):
            assert torch.equal(pool.run(rows, threads), together[rows])


def test_unsupported_shapes_and_dtypes_say_why():
    odd = dataclasses.replace(TINY_MODEL_CONFIG, head_dim=12)
    assert "head_dim % 8 == 0" in native_backend_unavailable(odd, "float32", "cpu")
    assert "float32 on cpu" in native_backend_unavailable(TINY_MODEL_CONFIG, "bfloat16", "cpu")
    assert native_backend_unavailable(TINY_MODEL_CONFIG, "float32", "cpu") is None
    with pytest.raises(ValueError, match="attention_backend 'native' is unavailable.*bfloat16"):
        LLMEngine(EngineConfig(dtype="bfloat16", attention_backend="native", num_kv_blocks=4))
    engine = LLMEngine(EngineConfig(dtype="bfloat16", attention_backend="auto", num_kv_blocks=4))
    assert engine.executor.attention_backend == "torch"


def test_bad_backend_name_is_a_config_error():
    with pytest.raises(ValueError, match="attention_backend 'flash' is not one of"):
        EngineConfig(attention_backend="flash")


def test_no_compiler_falls_back_to_torch_or_says_why(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("LLMESH_KERNEL_CACHE", str(tmp_path / "cache"))
    kernels.paged_attention_library.cache_clear()
    try:
        with pytest.raises(kernels.KernelBuildError, match="no-such-cc"):
            kernels.paged_attention_library()
        engine = LLMEngine(EngineConfig(num_kv_blocks=4))
        assert engine.executor.attention_backend == "torch"
        with pytest.raises(ValueError, match="'native' is unavailable: cannot run the C compiler"):
            LLMEngine(EngineConfig(num_kv_blocks=4, attention_backend="native"))
    finally:
        kernels.paged_attention_library.cache_clear()
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_the_kernel_is_built_once_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMESH_KERNEL_CACHE", str(tmp_path))
    kernels.paged_attention_library.cache_clear()
    try:
        kernels.paged_attention_library()
        built = sorted(p.name for p in tmp_path.iterdir())
        assert len(built) == 1 and built[0].startswith("paged_attention-"), built
        assert built[0].endswith(".so")
        kernels.paged_attention_library.cache_clear()
        stamp = (tmp_path / built[0]).stat().st_mtime_ns
        kernels.paged_attention_library()  # a new process: finds it, builds nothing
        assert (tmp_path / built[0]).stat().st_mtime_ns == stamp
        assert sorted(p.name for p in tmp_path.iterdir()) == built
    finally:
        kernels.paged_attention_library.cache_clear()
