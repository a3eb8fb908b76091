"""The native kernels: attention is attention (close to a float64 reference), the layer
ops match their torch versions, every row's output is the same bits however the rows
are batched, tiled or threaded, and the engine falls back to torch kernels (or says
why not) when the native ones cannot serve."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest
import torch
import torch.nn.functional as F

from services.worker.engine import EngineConfig, LLMEngine, native
from services.worker.engine import kernels as kernel_build
from services.worker.engine.errors import KernelArgumentError
from services.worker.engine.model import apply_rope, rms_norm, silu
from services.worker.engine.native import NativeRows
from services.worker.engine.tiny import TINY_MODEL_CONFIG
from tests.unit.worker.engine.helpers import NO_NATIVE_KERNELS

REPO_ROOT = Path(__file__).resolve().parents[4]

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
        rows = NativeRows(
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
            native.paged_attention(
                self.queries[row_ids], self.cache, rows, out, self.head_dim**-0.5
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


@pytest.mark.usefixtures("needs_native_kernels")
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
    assert "multiples of 8 (this model: head_dim 12)" in native.unavailable(odd, "float32", "cpu")
    assert "float32 on cpu" in native.unavailable(TINY_MODEL_CONFIG, "bfloat16", "cpu")
    with pytest.raises(ValueError, match="kernels 'native' are unavailable.*bfloat16"):
        LLMEngine.from_config(EngineConfig(dtype="bfloat16", kernels="native", num_kv_blocks=4))
    engine = LLMEngine.from_config(EngineConfig(dtype="bfloat16", kernels="auto", num_kv_blocks=4))
    assert engine.executor.kernels == "torch"


def test_bad_kernels_name_is_a_config_error():
    with pytest.raises(ValueError, match="kernels 'flash' is not one of"):
        EngineConfig(kernels="flash")


def test_no_compiler_falls_back_to_torch_or_says_why(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("LLMESH_KERNEL_CACHE", str(tmp_path / "cache"))
    kernel_build.library.cache_clear()
    try:
        with pytest.raises(kernel_build.KernelBuildError, match="no-such-cc"):
            kernel_build.library()
        engine = LLMEngine.from_config(EngineConfig(num_kv_blocks=4))
        assert engine.executor.kernels == "torch"
        with pytest.raises(ValueError, match="'native' are unavailable: cannot run the C compiler"):
            LLMEngine.from_config(EngineConfig(num_kv_blocks=4, kernels="native"))
    finally:
        kernel_build.library.cache_clear()
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


@pytest.mark.usefixtures("needs_native_kernels")
def test_the_kernel_is_built_once_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMESH_KERNEL_CACHE", str(tmp_path))
    kernel_build.library.cache_clear()
    try:
        assert native.unavailable(TINY_MODEL_CONFIG, "float32", "cpu") is None  # builds them
        built = sorted(p.name for p in tmp_path.iterdir())
        assert len(built) == 1 and built[0].startswith("llmesh_kernels-"), built
        assert built[0].endswith(".so")
        kernel_build.library.cache_clear()
        stamp = (tmp_path / built[0]).stat().st_mtime_ns
        kernel_build.library()  # a new process: finds it, builds nothing
        assert (tmp_path / built[0]).stat().st_mtime_ns == stamp
        assert sorted(p.name for p in tmp_path.iterdir()) == built
    finally:
        kernel_build.library.cache_clear()


def rows_invariant(op, x: torch.Tensor) -> torch.Tensor:
    """op's rows are the same bits alone, in the batch, and with one or two threads."""
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        together = op(x)
        torch.set_num_threads(1)
        assert torch.equal(op(x), together)
        for r in sorted({0, x.shape[0] // 2, x.shape[0] - 1}):
            assert torch.equal(op(x[r : r + 1].clone())[0], together[r]), f"row {r}"
    finally:
        torch.set_num_threads(previous)
    return together


@pytest.mark.usefixtures("needs_native_kernels")
@pytest.mark.parametrize("num_rows", [3, 300])  # 300 rows: the threaded path
def test_layer_ops_match_torch_and_are_row_invariant(num_rows):
    generator = torch.Generator().manual_seed(num_rows)
    x = torch.randn(num_rows, 256, generator=generator) * 3
    weight = torch.randn(256, generator=generator)

    normed = rows_invariant(lambda t: native.rms_norm(t, weight, 1e-5), x)
    torch.testing.assert_close(normed, rms_norm(x, weight, 1e-5), rtol=2e-6, atol=2e-6)

    def add_norm(t):
        hidden, out = t[:, :128].clone(), torch.empty(t.shape[0], 128)
        native.add_rms_norm_(hidden, t[:, 128:], weight[:128], 1e-5, out)
        assert torch.equal(hidden, t[:, :128] + t[:, 128:])  # the residual, in place
        return out

    added = rows_invariant(add_norm, x)
    expected = rms_norm(x[:, :128] + x[:, 128:], weight[:128], 1e-5)
    torch.testing.assert_close(added, expected, rtol=2e-6, atol=2e-6)

    gate_up = torch.cat([x * 10, x], dim=1)  # gates out to +-100: exp's clamps
    act = rows_invariant(native.silu_mul, gate_up)
    torch.testing.assert_close(act, silu(gate_up[:, :256]) * x, rtol=1e-5, atol=1e-6)


@pytest.mark.usefixtures("needs_native_kernels")
def test_rope_is_bit_for_bit_the_torch_rope():
    generator = torch.Generator().manual_seed(3)
    heads, head_dim, extra = 10, 32, 64  # rotate 10 heads of rows 10 * 32 + 64 wide
    x = torch.randn(40, heads * head_dim + extra, generator=generator)
    angles = torch.randn(40, 1, head_dim // 2, generator=generator) * 50
    cos, sin = angles.cos(), angles.sin()
    expected = apply_rope(x[:, : heads * head_dim].view(40, heads, head_dim), cos, sin)
    rotated = x.clone()
    native.rope_(rotated, heads, head_dim, cos.view(40, -1), sin.view(40, -1))
    assert torch.equal(rotated[:, : heads * head_dim].view(40, heads, head_dim), expected)
    assert torch.equal(rotated[:, heads * head_dim :], x[:, heads * head_dim :])  # untouched


@pytest.mark.usefixtures("needs_native_kernels")
def test_write_kv_puts_each_row_in_its_slot():
    k_and_v = torch.arange(5 * 2 * 2 * 8, dtype=torch.float32).view(5, 2 * 2 * 8)
    k = k_and_v[:, :16].view(5, 2, 8)
    v = k_and_v[:, 16:].view(5, 2, 8)
    cache = torch.zeros(2, 2, 3, 4, 8)  # 3 blocks of 4 slots
    slots = torch.tensor([11, 0, 5, 6, 3])
    native.write_kv(k, v, slots, cache)
    flat = cache.view(2, 2, 12, 8)
    for row, slot in enumerate(slots.tolist()):
        assert torch.equal(flat[0, :, slot], k[row]) and torch.equal(flat[1, :, slot], v[row])
    written = set(slots.tolist())
    assert all(flat[:, :, s].abs().sum() == 0 for s in range(12) if s not in written)


@pytest.mark.usefixtures("needs_native_kernels")
@pytest.mark.parametrize(
    ("in_features", "out_features", "bias"),
    [(256, 384, False), (264, 259, True), (40, 7, True), (768, 256, False)],
)  # 264: a second 256-input block; 259, 7: panels of 16 cut short
def test_linear_matches_torch_and_every_row_is_computed_alone(in_features, out_features, bias):
    generator = torch.Generator().manual_seed(in_features + out_features)
    weight = torch.randn(out_features, in_features, generator=generator) / in_features**0.5
    b = torch.randn(out_features, generator=generator) if bias else None
    x = torch.randn(70, in_features, generator=generator)
    together = rows_invariant(lambda t: native.linear(t, weight, b), x)
    torch.testing.assert_close(together, F.linear(x, weight, b), rtol=1e-5, atol=1e-5)
    # Any row count (no padding to 16 rows as MKL needs) and a strided x.
    for rows in (1, 5, 6, 7, 13):
        assert torch.equal(native.linear(x[:rows], weight, b), together[:rows]), rows
    wide = torch.cat([x, x], dim=1)[:, :in_features]
    assert torch.equal(native.linear(wide, weight, b), together)
    # Each element is one chain of adds in input order, then the bias: check one exactly.
    expected = torch.zeros((), dtype=torch.float32)
    for k in range(in_features):
        expected = expected + x[3, k] * weight[2, k]
    if b is not None:
        expected = expected + b[2]
    assert together[3, 2] == expected


@pytest.mark.usefixtures("needs_native_kernels")
def test_packed_weights_give_the_same_bits_and_unpack_exactly():
    generator = torch.Generator().manual_seed(11)
    weight = torch.randn(48, 264, generator=generator)
    bias = torch.randn(48, generator=generator)
    x = torch.randn(9, 264, generator=generator)
    packed = native.pack_weight(weight)
    assert packed.shape == (3, 264, 16) and packed.numel() == weight.numel()
    assert torch.equal(packed[1, 5], weight[16:32, 5])  # panel 1, input 5: columns 16..31
    assert torch.equal(native.unpack_weight(packed), weight)
    assert torch.equal(native.linear(x, packed, bias), native.linear(x, weight, bias))


def test_a_native_engine_holds_packed_matrices_and_exports_them_unpacked(make_engine):
    from services.worker.engine.weights import TinyWeightSource, to_hf_tensors

    native_engine = make_engine(kernels="native", num_kv_blocks=4)
    torch_engine = make_engine(kernels="torch", num_kv_blocks=4)
    layer = native_engine.model.weights.layers[0]
    assert layer.qkv_proj.dim() == 3 and torch_engine.model.weights.layers[0].qkv_proj.dim() == 2
    assert native_engine.weight_nbytes == torch_engine.weight_nbytes
    exported = to_hf_tensors(TINY_MODEL_CONFIG, native_engine.model.weights)
    source = TinyWeightSource().load(list(exported))
    assert all(torch.equal(exported[name], source[name]) for name in exported)


def _stage(layer_start: int, layer_end: int, packed: bool, biases: bool):
    """The tiny model's layers [layer_start, layer_end) as a native LlamaModel; its
    matrices packed or left (N, K); with random biases on every matmul, or none."""
    from services.worker.engine.model import LlamaModel
    from services.worker.engine.weights import TinyWeightSource, build_stage_weights, hf_names

    c = TINY_MODEL_CONFIG
    tensors = TinyWeightSource().load(hf_names(c, layer_start, layer_end))
    weights = build_stage_weights(c, tensors, layer_start, layer_end, "float32", "cpu")
    generator = torch.Generator().manual_seed(5)
    if biases:
        for w in weights.layers.values():
            for field, matrix in (("qkv", w.qkv_proj), ("o", w.o_proj),
                                  ("gate_up", w.gate_up_proj), ("down", w.down_proj)):  # fmt: skip
                setattr(w, f"{field}_bias", torch.randn(matrix.shape[0], generator=generator))
    model = LlamaModel(c, weights, kernels="native" if packed else "torch")
    model.kernels = "native"  # unpacked matrices run the native path too
    return model


@pytest.mark.usefixtures("needs_native_kernels")
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    "held, run, packed, biases",
    [
        ((0, 4), (0, 4), True, False),
        ((1, 3), (1, 3), False, True),
        ((2, 4), (2, 4), True, True),
        ((0, 4), (1, 3), True, True),  # a range inside what the model holds
    ],
)
def test_decoder_layers_in_one_call_are_the_op_by_op_path_bit_for_bit(
    threads, held, run, packed, biases
):
    """native.NativeLayers (one call per step, given paged_kv) against the same layers
    run op by op (through the attention function alone): same hidden states, same K/V
    written to the same slots, for decodes and prefill chunks together, any layer range."""
    from services.worker.engine.attention import PagedAttention, build_attention_metadata
    from services.worker.engine.kv_cache import KVCache

    c, block_size = TINY_MODEL_CONFIG, 16
    model = _stage(*held, packed, biases)
    assert (model.weights.layers[held[0]].qkv_proj.dim() == 3) == packed
    generator = torch.Generator().manual_seed(7)
    cache = KVCache(c, *held, 40, block_size, "float32", "cpu")
    for pool in cache.layers.values():
        pool.copy_(torch.randn(pool.shape, generator=generator))  # earlier tokens' K/V
    order = torch.randperm(40, generator=generator).tolist()
    # Decodes at positions 0, 17, 70; prefill chunks: 5 tokens from 0, 30 from 33.
    decodes = [(0, order[0:1]), (17, order[1:3]), (70, order[3:8])]
    prefills = [(0, 5, order[8:9]), (33, 30, order[9:13])]
    positions = [p for p, _ in decodes] + list(range(0, 5)) + list(range(33, 63))
    hidden = torch.randn(len(positions), c.hidden_size, generator=generator)
    original = hidden.clone()
    meta = build_attention_metadata(
        decodes, prefills, block_size, c.num_queries_per_kv, "cpu", "native"
    )
    position_ids = torch.tensor(positions)

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        initial = {i: pool.clone() for i, pool in cache.layers.items()}
        attention = PagedAttention(c, cache, meta)
        paged_kv = native.PagedKV(cache.layers, meta.slot_mapping, meta.native)
        fused = model.forward_layers(hidden, position_ids, attention, *run, paged_kv=paged_kv)
        fused_pools = {i: pool.clone() for i, pool in cache.layers.items()}
        for i, pool in cache.layers.items():
            pool.copy_(initial[i])
        op_by_op = model.forward_layers(hidden, position_ids, attention, *run)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(fused, op_by_op) and fused.isfinite().all()
    assert torch.equal(hidden, original)  # the caller's hidden states are left alone
    for i, pool in cache.layers.items():
        assert torch.equal(fused_pools[i], pool)
        # this step's K/V went into the layers that ran, and only those
        assert torch.equal(pool, initial[i]) == (not run[0] <= i < run[1])


@pytest.mark.usefixtures("needs_native_kernels")
def test_decoder_layers_reject_mismatched_inputs():
    from services.worker.engine.attention import build_attention_metadata
    from services.worker.engine.kv_cache import KVCache

    c = TINY_MODEL_CONFIG
    model = _stage(0, 1, packed=True, biases=False)
    cache = KVCache(c, 0, 1, 4, 16, "float32", "cpu")
    meta = build_attention_metadata([(3, [2])], [], 16, c.num_queries_per_kv, "cpu", "native")
    cos, sin = torch.zeros(1, c.head_dim // 2), torch.zeros(1, c.head_dim // 2)
    layer = model.weights.layers[0]
    stack = native.NativeLayers(c, {0: layer})
    with pytest.raises(KernelArgumentError):  # two rows of hidden states, one row of metadata
        stack.run(
            torch.zeros(2, c.hidden_size), 0, 1, cache.layers, cos, sin, meta.slot_mapping,
            meta.native,
        )  # fmt: skip
    with pytest.raises(KernelArgumentError):  # a layer this stack does not hold
        stack.run(
            torch.zeros(1, c.hidden_size), 0, 2, cache.layers, cos, sin, meta.slot_mapping,
            meta.native,
        )  # fmt: skip
    with pytest.raises(KernelArgumentError, match="pools hold layers"):  # no KV pool
        stack.run(torch.zeros(1, c.hidden_size), 0, 1, {}, cos, sin, meta.slot_mapping, meta.native)
    wrong = dataclasses.replace(layer, down_proj=layer.down_proj[:, :8].contiguous())
    with pytest.raises(KernelArgumentError):  # a matrix of the wrong shape
        native.NativeLayers(c, {0: wrong})


# ---- guards and a machine without a C compiler ----------------------------------------


def test_wrong_tensors_raise_value_errors_before_any_native_call():
    """Every check runs before the library is even loaded: these need no compiler."""
    x, weight = torch.zeros(3, 16), torch.zeros(32, 16)
    rows = NativeRows(
        *(torch.zeros(1, dtype=torch.int32),) * 2, torch.zeros(1, 1, dtype=torch.int32)
    )
    wrong = {  # what the message names: the call
        "weight: expected a contiguous torch.float32 cpu tensor of shape (32, 16)": lambda: (
            native.linear(x, torch.zeros(32, 24))  # K 16 against 24
        ),
        "width 12 is not a multiple of 8": lambda: native.linear(
            torch.zeros(3, 12), torch.zeros(32, 12)
        ),
        "x: expected float32 on cpu": lambda: native.linear(x.double(), weight),
        "x: expected rows of 16 contiguous floats": lambda: native.linear(
            torch.zeros(16, 3).t(), weight
        ),
        "weight bias: expected": lambda: native.linear(x, weight, torch.zeros(31)),
        "N a multiple of 16": lambda: native.pack_weight(torch.zeros(24, 16)),
        "x: expected rows of 8": lambda: native.rms_norm(torch.zeros(3, 16), torch.zeros(8), 1e-5),
        "norm weight: expected (H,), got ()": lambda: native.rms_norm(
            torch.zeros(3, 16), torch.tensor(1.0), 1e-5
        ),
        "norm weight: width 12 is not a multiple of 8": lambda: native.add_rms_norm_(
            torch.zeros(3, 12), torch.zeros(3, 12), torch.zeros(12), 1e-5, torch.zeros(3, 12)
        ),
        "silu_mul: width 6": lambda: native.silu_mul(torch.zeros(3, 12)),
        "hidden, delta and out have 3, 2 and 3 rows": lambda: native.add_rms_norm_(
            torch.zeros(3, 16), torch.zeros(2, 16), torch.zeros(16), 1e-5, torch.zeros(3, 16)
        ),
        "sin: expected": lambda: native.rope_(
            torch.zeros(3, 16), 2, 8, torch.zeros(3, 4), torch.zeros(2, 4)
        ),
        "slots: expected a contiguous torch.int64": lambda: native.write_kv(
            torch.zeros(3, 2, 8),
            torch.zeros(3, 2, 8),
            torch.zeros(3, dtype=torch.int32),
            torch.zeros(2, 2, 4, 4, 8),
        ),  # fmt: skip
        "64 query heads over 2 KV heads": lambda: native.paged_attention(
            torch.zeros(1, 64, 8), torch.zeros(2, 2, 4, 4, 8), rows, torch.zeros(1, 512), 1.0
        ),
    }
    for message, call in wrong.items():
        with pytest.raises(KernelArgumentError, match=re.escape(message)):
            call()
    assert issubclass(KernelArgumentError, ValueError)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"head_dim": 12}, "multiples of 8 (this model: head_dim 12)"),
        ({"hidden_size": 100, "intermediate_size": 36}, "hidden_size 100, intermediate_size 36"),
        ({"num_heads": 34, "num_kv_heads": 2}, "at most 16 query heads per KV head"),
    ],
)
def test_a_model_shape_the_kernels_cannot_take_is_one_reason_for_both_checks(changes, reason):
    config = dataclasses.replace(TINY_MODEL_CONFIG, **changes)
    assert reason in native.unavailable(config, "float32", "cpu")
    with pytest.raises(KernelArgumentError, match=re.escape("native decoder layers: they")) as e:
        native.NativeLayers(config, {})
    assert reason in str(e.value)


def test_the_guards_hold_under_python_O():
    """They are checks, not asserts: `python -O` keeps them."""
    script = (
        "import torch\n"
        "from services.worker.engine import native\n"
        "assert False, 'asserts run: not -O'\n"
    )
    result = subprocess.run([sys.executable, "-O", "-c", script + _CALL_WITH_A_WRONG_K], **_RUN)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "KernelArgumentError"


_CALL_WITH_A_WRONG_K = """
try:
    native.linear(torch.zeros(3, 16), torch.zeros(32, 24))
except ValueError as e:
    print(type(e).__name__)
"""
_RUN = {"cwd": REPO_ROOT, "capture_output": True, "text": True, "timeout": 120}

# The tests in this file that need the native kernels (skipped without a compiler).
NEEDS_NATIVE = {
    "test_a_row_gets_the_same_bits_however_it_is_batched",
    "test_the_kernel_is_built_once_into_the_cache",
    "test_layer_ops_match_torch_and_are_row_invariant",
    "test_rope_is_bit_for_bit_the_torch_rope",
    "test_write_kv_puts_each_row_in_its_slot",
    "test_linear_matches_torch_and_every_row_is_computed_alone",
    "test_packed_weights_give_the_same_bits_and_unpack_exactly",
    "test_a_native_engine_holds_packed_matrices_and_exports_them_unpacked",
    "test_decoder_layers_in_one_call_are_the_op_by_op_path_bit_for_bit",
    "test_decoder_layers_reject_mismatched_inputs",
}


def test_without_a_compiler_the_native_tests_skip_and_the_rest_pass(tmp_path):
    """This file in a fresh pytest, with CC naming no compiler and an empty kernel cache:
    the tests that need the native kernels skip, saying why; every other one passes."""
    env = {k: v for k, v in os.environ.items() if k != "LLMESH_KERNELS"}
    env.update(CC=str(tmp_path / "no-such-cc"), LLMESH_KERNEL_CACHE=str(tmp_path / "cache"))
    this = "tests/unit/worker/engine/test_native_kernels.py"
    report = tmp_path / "report.xml"
    command = [
        sys.executable, "-m", "pytest", this, "-q", "-p", "no:cacheprovider",
        f"--junitxml={report}", "--deselect", f"{this}::{_this_test_name()}",
    ]  # fmt: skip
    result = subprocess.run(command, env=env, **{**_RUN, "timeout": 600})
    assert result.returncode == 0, result.stdout[-3000:]
    outcomes: dict[str, set[str]] = {}
    for case in ElementTree.parse(report).iter("testcase"):
        name = case.get("name", "").split("[")[0]
        skipped = case.find("skipped")
        if skipped is not None:
            assert NO_NATIVE_KERNELS in skipped.get("message", ""), skipped.get("message")
            assert "no-such-cc" in skipped.get("message", ""), skipped.get("message")
        outcome = "skipped" if skipped is not None else "passed"
        assert case.find("failure") is None and case.find("error") is None, name
        outcomes.setdefault(outcome, set()).add(name)
    assert outcomes["skipped"] == NEEDS_NATIVE
    assert outcomes["passed"] == {
        "test_unsupported_shapes_and_dtypes_say_why",
        "test_bad_kernels_name_is_a_config_error",
        "test_no_compiler_falls_back_to_torch_or_says_why",
        "test_wrong_tensors_raise_value_errors_before_any_native_call",
        "test_a_model_shape_the_kernels_cannot_take_is_one_reason_for_both_checks",
        "test_the_guards_hold_under_python_O",
    }
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def _this_test_name() -> str:
    return test_without_a_compiler_the_native_tests_skip_and_the_rest_pass.__name__
