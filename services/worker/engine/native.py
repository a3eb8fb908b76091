"""Tensor-level wrappers of the native kernels (kernels/), the "native" backend.

With EngineConfig.kernels == "native" (or "auto" where it applies) the engine runs its
matmuls, attention, RMSNorm, RoPE, SwiGLU activation and KV writes through these: a
step's decoder layers in one call (`NativeLayers`), the rest op by op. Every wrapper
takes float32 CPU tensors whose rows are contiguous (any row stride) and checks what
the C code assumes, so a wrong call raises instead of reading past a buffer.
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING

import torch

from services.worker.engine.config import ModelConfig
from services.worker.engine.kernels import KernelBuildError, library

if TYPE_CHECKING:
    from services.worker.engine.attention import NativeRows
    from services.worker.engine.model import LayerWeights

MAX_QUERIES_PER_KV = 16  # the attention kernel's per-tile head arrays


def unavailable(config: ModelConfig, dtype: str, device: str) -> str | None:
    """Why the native kernels cannot run this model, or None if they can (builds them)."""
    if dtype != "float32" or device != "cpu":
        return f"they run float32 on cpu only (this engine: {dtype} on {device})"
    widths = {
        "head_dim": config.head_dim,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
    }
    odd = [f"{name} {value}" for name, value in widths.items() if value % 8]
    if odd:
        return f"they need widths that are multiples of 8 (this model: {', '.join(odd)})"
    if config.num_queries_per_kv > MAX_QUERIES_PER_KV:
        return (
            f"they take at most {MAX_QUERIES_PER_KV} query heads per KV head "
            f"(this model: {config.num_queries_per_kv})"
        )
    try:
        library()
    except KernelBuildError as e:
        return str(e)
    return None


def _rows(x: torch.Tensor, width: int) -> int:
    """x's row stride, after checking it is float32 rows of `width` contiguous floats."""
    assert x.dtype == torch.float32 and x.device.type == "cpu", (x.dtype, x.device)
    assert x.dim() == 2 and x.shape[1] == width and x.stride(1) == 1, (x.shape, x.stride())
    return x.stride(0)


PANEL = 16  # output columns per panel of a packed weight (kernels/linear.c NR)


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """(N, K) -> (N / 16, K, 16): weight packed in linear's panel layout (the same numbers,
    the same bytes), so that matmuls read it straight instead of transposing it every
    call. N must be a multiple of 16."""
    n, k = weight.shape
    assert n % PANEL == 0 and k % 8 == 0 and weight.is_contiguous(), weight.shape
    assert weight.dtype == torch.float32 and weight.device.type == "cpu"
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


def _check_matrix(weight: torch.Tensor, bias: torch.Tensor | None, n: int, k: int) -> bool:
    """Checks W (N, K), or packed (N / 16, K, 16), and its bias (N,) for the C code;
    returns whether W is packed."""
    packed = weight.dim() == 3
    assert weight.shape == ((n // PANEL, k, PANEL) if packed else (n, k)), (weight.shape, n, k)
    assert weight.is_contiguous() and weight.dtype == torch.float32
    assert bias is None or (bias.shape == (n,) and bias.is_contiguous())
    return packed


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """(T, K) @ W^T (+ bias (N,)) -> (T, N). weight: W (N, K), or pack_weight(W) (same
    bits, faster)."""
    rows, k = x.shape
    n = weight.shape[0] * PANEL if weight.dim() == 3 else weight.shape[0]
    packed = _check_matrix(weight, bias, n, k)
    out = torch.empty(rows, n)
    kernel = library().llmesh_linear_packed if packed else library().llmesh_linear
    status = kernel(
        x.data_ptr(), _rows(x, k), rows, k, weight.data_ptr(), n,
        None if bias is None else bias.data_ptr(), out.data_ptr(), n, torch.get_num_threads(),
    )  # fmt: skip
    if status != 0:
        raise MemoryError("native linear: no memory for its scratch buffers")
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """(T, H) -> (T, H): weight * (x / sqrt(mean(x^2) + eps)), per row."""
    rows, width = x.shape
    out = torch.empty(rows, width)
    library().llmesh_rms_norm(
        x.data_ptr(), _rows(x, width), weight.data_ptr(), eps, rows, width,
        out.data_ptr(), width, torch.get_num_threads(),
    )  # fmt: skip
    return out


def add_rms_norm_(
    hidden: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor
) -> None:
    """hidden += delta (in place), then out = rms_norm(hidden); all (T, H)."""
    rows, width = hidden.shape
    assert delta.shape == hidden.shape == out.shape and weight.is_contiguous()
    library().llmesh_add_rms_norm(
        hidden.data_ptr(), _rows(hidden, width), delta.data_ptr(), _rows(delta, width),
        weight.data_ptr(), eps, rows, width, out.data_ptr(), _rows(out, width),
        torch.get_num_threads(),
    )  # fmt: skip


def rope_(x: torch.Tensor, heads: int, head_dim: int, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotates heads [0, heads) of every row of x (T, >= heads * hd) in place; cos, sin
    (T, hd / 2) contiguous. HF's rotate_half convention."""
    rows = x.shape[0]
    assert x.shape[1] >= heads * head_dim and cos.shape == sin.shape == (rows, head_dim // 2)
    assert cos.is_contiguous() and sin.is_contiguous() and cos.dtype == torch.float32
    library().llmesh_rope(
        x.data_ptr(), _rows(x, x.shape[1]), heads, head_dim, cos.data_ptr(), sin.data_ptr(),
        rows, torch.get_num_threads(),
    )  # fmt: skip


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """(T, 2I) rows [gate | up] -> (T, I): silu(gate) * up."""
    rows, double = gate_up.shape
    width = double // 2
    out = torch.empty(rows, width)
    library().llmesh_silu_mul(
        gate_up.data_ptr(), _rows(gate_up, double), rows, width, out.data_ptr(), width,
        torch.get_num_threads(),
    )  # fmt: skip
    return out


def write_kv(k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, cache: torch.Tensor) -> None:
    """Rows of k, v (T, nkv, hd) into their slots of cache (2, nkv, NB, bs, hd); k and v
    are views with the same row stride (columns of one qkv matrix)."""
    rows, kv_heads, head_dim = k.shape
    _, _, num_blocks, block_size, _ = cache.shape
    assert v.shape == k.shape and v.stride() == k.stride() and k.stride()[1:] == (head_dim, 1)
    assert slots.dtype == torch.int64 and slots.is_contiguous() and slots.numel() == rows
    assert cache.is_contiguous() and cache.dtype == k.dtype == torch.float32
    library().llmesh_write_kv(
        k.data_ptr(), v.data_ptr(), k.stride(0), slots.data_ptr(), rows,
        cache[0].data_ptr(), cache[1].data_ptr(), num_blocks * block_size, kv_heads, head_dim,
    )  # fmt: skip


def paged_attention(
    q: torch.Tensor, cache: torch.Tensor, rows: NativeRows, out: torch.Tensor, scale: float
) -> None:
    """Every row of q (T, nh, hd) attends over its sequence's keys in cache (2, nkv, NB,
    bs, hd) (this step's K/V already written); writes out (T, nh * hd)."""
    num_rows, num_heads, head_dim = q.shape
    if q.stride(2) != 1 or q.stride(1) != head_dim:
        q = q.contiguous()
    _, num_kv_heads, num_blocks, block_size, _ = cache.shape
    assert cache.is_contiguous() and out.is_contiguous()
    assert q.dtype == cache.dtype == out.dtype == torch.float32
    assert rows.positions.numel() == rows.row_seq.numel() == num_rows
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
    and checked once (LlamaModel is rebuilt whenever its weights change): a step copies
    them and fills in the KV pools' addresses."""

    def __init__(self, config: ModelConfig, layers: dict[int, LayerWeights]) -> None:
        self.config = config
        self.layer_start = min(layers)
        assert sorted(layers) == list(range(self.layer_start, self.layer_start + len(layers)))
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
            is_packed = _check_matrix(matrix, bias, n, k)
            setattr(struct, name, matrix.data_ptr())
            setattr(struct, f"{name}_bias", None if bias is None else bias.data_ptr())
            struct.packed |= is_packed << bit
        for norm in (w.input_norm, w.post_attention_norm):
            assert norm.shape == (c.hidden_size,) and norm.is_contiguous()
        for vector in (w.input_norm, w.post_attention_norm, *(m[1] for m in matrices.values())):
            assert vector is None or vector.dtype == torch.float32
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
        num_rows = hidden.shape[0]
        first = layer_start - self.layer_start
        assert first >= 0 and layer_end - self.layer_start <= len(self.structs)
        assert hidden.shape == (num_rows, c.hidden_size) and hidden.is_contiguous()
        assert hidden.dtype == torch.float32 and layer_start < layer_end
        assert cos.shape == sin.shape == (num_rows, c.head_dim // 2)
        assert cos.is_contiguous() and sin.is_contiguous()
        assert cos.dtype == sin.dtype == torch.float32
        assert slots.dtype == torch.int64 and slots.is_contiguous() and slots.numel() == num_rows
        assert rows.positions.numel() == rows.row_seq.numel() == num_rows
        for index in (rows.row_seq, rows.positions, rows.block_tables):
            assert index.dtype == torch.int32 and index.is_contiguous()
        shape = pools[layer_start].shape  # (2, nkv, NB, bs, hd)
        assert shape[1] == c.num_kv_heads and shape[4] == c.head_dim, shape
        half = shape.numel() // 2 * 4  # bytes from K to V
        # This call's own copy: the model's structs stay as built (no state across calls).
        num_layers = layer_end - layer_start
        structs = (_Layer * num_layers).from_buffer_copy(
            self.structs, first * ctypes.sizeof(_Layer)
        )
        for struct, index in zip(structs, range(layer_start, layer_end), strict=True):
            pool = pools[index]
            assert pool.shape == shape and pool.is_contiguous() and pool.dtype == torch.float32
            struct.cache_k = pool.data_ptr()
            struct.cache_v = struct.cache_k + half
        status = library().llmesh_decoder_layers(
            hidden.data_ptr(), num_rows, structs, num_layers, c.hidden_size, c.intermediate_size, c.num_heads,
            c.num_kv_heads, c.head_dim, c.rms_norm_eps, c.head_dim**-0.5, cos.data_ptr(),
            sin.data_ptr(), slots.data_ptr(), shape[2] * shape[3], shape[3],
            rows.block_tables.data_ptr(), rows.block_tables.shape[1], rows.row_seq.data_ptr(),
            rows.positions.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        if status == -2:
            raise MemoryError("native decoder layers: no memory for their buffers")
        if status != 0:
            raise RuntimeError(f"native decoder layers failed (status {status})")
