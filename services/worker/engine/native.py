"""Tensor-level wrappers of the native kernels (kernels/): EngineConfig.kernels "native".

With kernels "native" (or "auto" where they apply) the engine runs its matmuls,
attention, RMSNorm, RoPE, SwiGLU activation and KV writes through these: a step's
decoder layers in one call (`NativeLayers`), the rest op by op. Every wrapper takes
float32 CPU tensors whose rows are contiguous (any row stride) and checks the shapes,
dtypes and layouts the C code assumes before calling it (native_checks.py), raising
KernelArgumentError (a ValueError; real checks, not asserts, so they hold under
`python -O`): a wrong call raises instead of reading past a buffer. The values inside
index tensors (slots, positions, block tables) are the caller's invariant: checking
them would cost a pass over them every step.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from services.worker.engine.config import ModelConfig
from services.worker.engine.errors import KernelArgumentError
from services.worker.engine.kernels import KernelBuildError, library
from services.worker.engine.native_checks import (
    MAX_QUERIES_PER_KV,
    PANEL,
    check_matrix,
    check_norm_weight,
    check_pool,
    check_row_tables,
    check_rows,
    check_tensor,
    check_width,
    unsupported_shape,
)
from services.worker.engine.stage_weights import LayerWeights


@dataclass
class NativeRows:
    """What the native attention reads per row: its sequence (a row of block_tables)
    and its position (it attends to keys 0 .. position). A sequence's rows are adjacent."""

    row_seq: torch.Tensor  # (T,) int32
    positions: torch.Tensor  # (T,) int32
    block_tables: torch.Tensor  # (S, most blocks of any sequence) int32, zero-padded


@dataclass
class PagedKV:
    """One step over the paged KV pool, for running a layer range in one native call
    (LlamaModel.forward_layers): the pools, where this step's K/V go, and its rows."""

    pools: dict[int, torch.Tensor]  # layer -> (2, nkv, NB, bs, hd), KVCache.layers
    slot_mapping: torch.Tensor  # (T,) int64: block_id * block_size + offset of each row
    rows: NativeRows


def unavailable(config: ModelConfig, dtype: str, device: str) -> str | None:
    """Why the native kernels cannot run this model, or None if they can (builds them)."""
    if dtype != "float32" or device != "cpu":
        return f"they run float32 on cpu only (this engine: {dtype} on {device})"
    reason = unsupported_shape(config)
    if reason is not None:
        return reason
    try:
        library()
    except KernelBuildError as e:
        return str(e)
    return None


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """(N, K) -> (N / 16, K, 16): weight packed in linear's panel layout (the same numbers,
    the same bytes), so that matmuls read it straight instead of transposing it every
    call. N must be a multiple of 16."""
    if weight.dim() != 2 or weight.shape[0] % PANEL:
        raise KernelArgumentError(
            f"weight: expected (N, K) with N a multiple of {PANEL}, got {tuple(weight.shape)}"
        )
    n, k = weight.shape
    check_width("weight", k)
    check_tensor("weight", weight, (n, k))
    packed = torch.empty(n // PANEL, k, PANEL)
    library().llmesh_pack_weight(
        weight.data_ptr(), n, k, packed.data_ptr(), torch.get_num_threads()
    )
    return packed


def unpack_weight(weight: torch.Tensor) -> torch.Tensor:
    """pack_weight's inverse (a copy); any tensor that is not packed is returned as it is."""
    if weight.dim() != 3:
        return weight
    return weight.permute(0, 2, 1).reshape(-1, weight.shape[1])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """(T, K) @ W^T (+ bias (N,)) -> (T, N). weight: W (N, K), or pack_weight(W) (same
    bits, faster)."""
    if x.dim() != 2 or weight.dim() not in (2, 3):
        raise KernelArgumentError(
            f"linear: expected x (T, K) and W (N, K) or packed, got {tuple(x.shape)} and "
            f"{tuple(weight.shape)}"
        )
    rows, k = x.shape
    n = weight.shape[0] * PANEL if weight.dim() == 3 else weight.shape[0]
    packed = check_matrix("weight", weight, bias, n, k)
    x_stride = check_rows("x", x, k)
    out = torch.empty(rows, n)
    kernel = library().llmesh_linear_packed if packed else library().llmesh_linear
    status = kernel(
        x.data_ptr(), x_stride, rows, k, weight.data_ptr(), n,
        None if bias is None else bias.data_ptr(), out.data_ptr(), n, torch.get_num_threads(),
    )  # fmt: skip
    if status != 0:
        raise MemoryError("native linear: no memory for its scratch buffers")
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """(T, H) -> (T, H): weight * (x / sqrt(mean(x^2) + eps)), per row."""
    width = check_norm_weight("norm weight", weight)
    x_stride = check_rows("x", x, width)
    rows = x.shape[0]
    out = torch.empty(rows, width)
    library().llmesh_rms_norm(
        x.data_ptr(), x_stride, weight.data_ptr(), eps, rows, width, out.data_ptr(), width,
        torch.get_num_threads(),
    )  # fmt: skip
    return out


def add_rms_norm_(
    hidden: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor
) -> None:
    """hidden += delta (in place), then out = rms_norm(hidden); all (T, H)."""
    width = check_norm_weight("norm weight", weight)
    strides = [
        check_rows(name, t, width)
        for name, t in (("hidden", hidden), ("delta", delta), ("out", out))
    ]
    rows = hidden.shape[0]
    if delta.shape[0] != rows or out.shape[0] != rows:
        raise KernelArgumentError(
            f"add_rms_norm_: hidden, delta and out have {rows}, {delta.shape[0]} and "
            f"{out.shape[0]} rows"
        )
    library().llmesh_add_rms_norm(
        hidden.data_ptr(), strides[0], delta.data_ptr(), strides[1], weight.data_ptr(), eps,
        rows, width, out.data_ptr(), strides[2], torch.get_num_threads(),
    )  # fmt: skip


def rope_(x: torch.Tensor, heads: int, head_dim: int, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotates heads [0, heads) of every row of x (T, >= heads * hd) in place; cos, sin
    (T, hd / 2) contiguous. HF's rotate_half convention."""
    if x.dim() != 2 or x.shape[1] < heads * head_dim or head_dim % 2:
        raise KernelArgumentError(
            f"rope_: x {tuple(x.shape)} does not hold {heads} heads of an even head_dim {head_dim}"
        )
    x_stride = check_rows("x", x, x.shape[1])
    rows = x.shape[0]
    check_tensor("cos", cos, (rows, head_dim // 2))
    check_tensor("sin", sin, (rows, head_dim // 2))
    library().llmesh_rope(
        x.data_ptr(), x_stride, heads, head_dim, cos.data_ptr(), sin.data_ptr(), rows,
        torch.get_num_threads(),
    )  # fmt: skip


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """(T, 2I) rows [gate | up] -> (T, I): silu(gate) * up."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2:
        raise KernelArgumentError(f"silu_mul: expected (T, 2I), got {tuple(gate_up.shape)}")
    rows, double = gate_up.shape
    width = double // 2
    check_width("silu_mul", width)
    stride = check_rows("gate_up", gate_up, double)
    out = torch.empty(rows, width)
    library().llmesh_silu_mul(
        gate_up.data_ptr(), stride, rows, width, out.data_ptr(), width, torch.get_num_threads()
    )
    return out


def write_kv(k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, cache: torch.Tensor) -> None:
    """Rows of k, v (T, nkv, hd) into their slots of cache (2, nkv, NB, bs, hd); k and v
    are views with the same row stride (columns of one qkv matrix)."""
    if k.dim() != 3:
        raise KernelArgumentError(f"write_kv: expected k (T, nkv, hd), got {tuple(k.shape)}")
    rows, kv_heads, head_dim = k.shape
    check_pool("cache", cache, kv_heads, head_dim)
    _, _, num_blocks, block_size, _ = cache.shape
    if (
        v.shape != k.shape
        or v.stride() != k.stride()
        or k.stride()[1:] != (head_dim, 1)
        or k.dtype != torch.float32
        or v.dtype != torch.float32
        or not (k.is_cpu and v.is_cpu)
    ):
        raise KernelArgumentError(
            f"write_kv: k and v must be float32 cpu views (T, nkv, hd) with contiguous heads "
            f"and one row stride, got {tuple(k.shape)} {k.stride()} {k.dtype} and "
            f"{tuple(v.shape)} {v.stride()} {v.dtype}"
        )
    check_tensor("slots", slots, (rows,), torch.int64)
    library().llmesh_write_kv(
        k.data_ptr(), v.data_ptr(), k.stride(0), slots.data_ptr(), rows,
        cache[0].data_ptr(), cache[1].data_ptr(), num_blocks * block_size, kv_heads, head_dim,
    )  # fmt: skip


def paged_attention(
    q: torch.Tensor, cache: torch.Tensor, rows: NativeRows, out: torch.Tensor, scale: float
) -> None:
    """Every row of q (T, nh, hd) attends over its sequence's keys in cache (2, nkv, NB,
    bs, hd) (this step's K/V already written); writes out (T, nh * hd)."""
    if q.dim() != 3 or cache.dim() != 5:
        raise KernelArgumentError(
            f"paged_attention: expected q (T, nh, hd) and cache (2, nkv, NB, bs, hd), got "
            f"{tuple(q.shape)} and {tuple(cache.shape)}"
        )
    num_rows, num_heads, head_dim = q.shape
    num_kv_heads = cache.shape[1]
    if num_heads % num_kv_heads or num_heads // num_kv_heads > MAX_QUERIES_PER_KV:
        raise KernelArgumentError(
            f"paged_attention: {num_heads} query heads over {num_kv_heads} KV heads "
            f"(a whole number, at most {MAX_QUERIES_PER_KV} per KV head)"
        )
    check_pool("cache", cache, num_kv_heads, head_dim)
    if q.dtype != torch.float32 or not q.is_cpu:
        raise KernelArgumentError(f"q: expected float32 on cpu, got {q.dtype} on {q.device}")
    if q.stride(2) != 1 or q.stride(1) != head_dim:
        q = q.contiguous()
    check_tensor("out", out, (num_rows, num_heads * head_dim))
    check_row_tables(rows.row_seq, rows.positions, rows.block_tables, num_rows)
    _, _, num_blocks, block_size, _ = cache.shape
    status = library().llmesh_paged_attention(
        q.data_ptr(), q.stride(0), cache[0].data_ptr(), cache[1].data_ptr(),
        num_blocks * block_size, block_size, rows.block_tables.data_ptr(),
        rows.block_tables.shape[1], rows.row_seq.data_ptr(), rows.positions.data_ptr(),
        num_rows, out.data_ptr(), out.stride(0), num_heads, num_kv_heads, head_dim, scale,
        torch.get_num_threads(),
    )  # fmt: skip
    if status != 0:
        raise RuntimeError(f"native paged attention failed (status {status})")


_MATRICES = ("qkv", "o", "gate_up", "down")  # bit i of llmesh_layer.packed: matrix i


class _Layer(ctypes.Structure):
    """kernels/decoder.c's llmesh_layer."""

    _fields_ = [
        (name, ctypes.c_void_p)
        for name in ("input_norm", "post_attention_norm", *_MATRICES)
        + tuple(f"{m}_bias" for m in _MATRICES)
        + ("cache_k", "cache_v")
    ] + [("packed", ctypes.c_int64)]


class NativeLayers:
    """A model's held decoder layers as kernels/decoder.c's llmesh_layer structs, built
    and checked once (LlamaModel builds them anew whenever its weights change): a step
    copies them and fills in the KV pools' addresses."""

    def __init__(self, config: ModelConfig, layers: dict[int, LayerWeights]) -> None:
        reason = unsupported_shape(config)
        if reason is not None:
            raise KernelArgumentError(f"native decoder layers: {reason}")
        self.config = config
        self.layer_start = min(layers)
        if sorted(layers) != list(range(self.layer_start, self.layer_start + len(layers))):
            raise KernelArgumentError(f"layers {sorted(layers)} are not a contiguous range")
        # The very tensors the structs point into, kept alive with them.
        self._tensors = [t for index in sorted(layers) for t in layers[index].tensors()]
        self.structs = (_Layer * len(layers))()
        for struct, index in zip(self.structs, sorted(layers), strict=True):
            self._fill(struct, layers[index])

    def _fill(self, struct: _Layer, w: LayerWeights) -> None:
        c = self.config
        matrices = {  # name: (matrix, bias, (N, K))
            "qkv": (w.qkv_proj, w.qkv_bias, (c.q_size + 2 * c.kv_size, c.hidden_size)),
            "o": (w.o_proj, w.o_bias, (c.hidden_size, c.q_size)),
            "gate_up": (w.gate_up_proj, w.gate_up_bias, (2 * c.intermediate_size, c.hidden_size)),
            "down": (w.down_proj, w.down_bias, (c.hidden_size, c.intermediate_size)),
        }
        struct.packed = 0
        for bit, name in enumerate(_MATRICES):
            matrix, bias, (n, k) = matrices[name]
            is_packed = check_matrix(name, matrix, bias, n, k)
            setattr(struct, name, matrix.data_ptr())
            setattr(struct, f"{name}_bias", None if bias is None else bias.data_ptr())
            struct.packed |= is_packed << bit
        check_tensor("input_norm", w.input_norm, (c.hidden_size,))
        check_tensor("post_attention_norm", w.post_attention_norm, (c.hidden_size,))
        struct.input_norm = w.input_norm.data_ptr()
        struct.post_attention_norm = w.post_attention_norm.data_ptr()

    def run(
        self,
        hidden: torch.Tensor,
        layer_start: int,
        layer_end: int,
        pools: dict[int, torch.Tensor],
        cos: torch.Tensor,
        sin: torch.Tensor,
        slots: torch.Tensor,
        rows: NativeRows,
    ) -> None:
        """Runs layers [layer_start, layer_end) over hidden (T, H) in place, each writing
        this step's K/V to its pool (2, nkv, NB, bs, hd) at slots (T,), then attending
        over it: model._layer's math in one native call for the whole range, the same
        bits as the op-by-op path. cos, sin: (T, hd / 2) contiguous."""
        c = self.config
        first = layer_start - self.layer_start
        held_end = self.layer_start + len(self.structs)
        if not self.layer_start <= layer_start < layer_end <= held_end:
            raise KernelArgumentError(
                f"layers [{layer_start}, {layer_end}) are not within the held "
                f"[{self.layer_start}, {held_end})"
            )
        if hidden.dim() != 2:
            raise KernelArgumentError(f"hidden: expected (T, H), got {tuple(hidden.shape)}")
        num_rows = hidden.shape[0]
        check_tensor("hidden", hidden, (num_rows, c.hidden_size))
        check_tensor("cos", cos, (num_rows, c.head_dim // 2))
        check_tensor("sin", sin, (num_rows, c.head_dim // 2))
        check_tensor("slots", slots, (num_rows,), torch.int64)
        check_row_tables(rows.row_seq, rows.positions, rows.block_tables, num_rows)
        first_pool = pools.get(layer_start)
        if first_pool is None:
            raise KernelArgumentError(f"pools hold layers {sorted(pools)}, not {layer_start}")
        check_pool("pool", first_pool, c.num_kv_heads, c.head_dim)
        shape = first_pool.shape  # (2, nkv, NB, bs, hd)
        half = shape.numel() // 2 * 4  # bytes from K to V
        # This call's own copy: the model's structs stay as built (no state across calls).
        num_layers = layer_end - layer_start
        structs = (_Layer * num_layers).from_buffer_copy(
            self.structs, first * ctypes.sizeof(_Layer)
        )
        for struct, index in zip(structs, range(layer_start, layer_end), strict=True):
            pool = pools.get(index)
            if (
                pool is None
                or pool.shape != shape
                or not pool.is_contiguous()
                or pool.dtype != torch.float32
                or not pool.is_cpu
            ):
                raise KernelArgumentError(
                    f"pool of layer {index}: expected a contiguous float32 cpu tensor "
                    f"{tuple(shape)} like layer {layer_start}'s, got "
                    f"{None if pool is None else (pool.dtype, tuple(pool.shape), pool.stride())}"
                )
            struct.cache_k = pool.data_ptr()
            struct.cache_v = struct.cache_k + half
        status = library().llmesh_decoder_layers(
            hidden.data_ptr(), num_rows, structs, num_layers, c.hidden_size, c.intermediate_size,
            c.num_heads, c.num_kv_heads, c.head_dim, c.rms_norm_eps, c.head_dim**-0.5,
            cos.data_ptr(), sin.data_ptr(), slots.data_ptr(), shape[2] * shape[3], shape[3],
            rows.block_tables.data_ptr(), rows.block_tables.shape[1], rows.row_seq.data_ptr(),
            rows.positions.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        if status == -2:
            raise MemoryError("native decoder layers: no memory for their buffers")
        if status != 0:
            raise RuntimeError(f"native decoder layers failed (status {status})")
