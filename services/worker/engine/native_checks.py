"""The checks in front of every native kernel call (native.py): shapes, dtypes and
layouts the C code assumes, raising KernelArgumentError (a ValueError; real checks, not
asserts, so they hold under `python -O`), and the model shapes the kernels take.

Imports nothing of native.py's: native.py imports these, never the other way.
"""

from __future__ import annotations

import torch

from services.worker.engine.config import ModelConfig
from services.worker.engine.errors import KernelArgumentError

MAX_QUERIES_PER_KV = 16  # the attention kernel's per-tile head arrays
WIDTH_MULTIPLE = 8  # the kernels' vectors: every row width is a multiple of 8 floats
PANEL = 16  # output columns per panel of a packed weight (kernels/linear.c NR)


def unsupported_shape(config: ModelConfig) -> str | None:
    """Why the kernels cannot run a model of this shape, or None if they can."""
    widths = {
        "head_dim": config.head_dim,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
    }
    odd = [f"{name} {value}" for name, value in widths.items() if value % WIDTH_MULTIPLE]
    if odd:
        return (
            f"they need widths that are multiples of {WIDTH_MULTIPLE} "
            f"(this model: {', '.join(odd)})"
        )
    if config.num_queries_per_kv > MAX_QUERIES_PER_KV:
        return (
            f"they take at most {MAX_QUERIES_PER_KV} query heads per KV head "
            f"(this model: {config.num_queries_per_kv})"
        )
    return None


def check_rows(name: str, x: torch.Tensor, width: int) -> int:
    """x's row stride, after checking it is float32 CPU rows of `width` contiguous floats."""
    if x.dtype != torch.float32 or not x.is_cpu:
        raise KernelArgumentError(f"{name}: expected float32 on cpu, got {x.dtype} on {x.device}")
    if x.dim() != 2 or x.shape[1] != width or x.stride(1) != 1:
        raise KernelArgumentError(
            f"{name}: expected rows of {width} contiguous floats, got shape "
            f"{tuple(x.shape)} with strides {x.stride()}"
        )
    return x.stride(0)


def check_tensor(
    name: str, x: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype = torch.float32
) -> None:
    """x is a contiguous CPU tensor of this shape and dtype."""
    if x.shape != shape or x.dtype != dtype or not x.is_cpu or not x.is_contiguous():
        raise KernelArgumentError(
            f"{name}: expected a contiguous {dtype} cpu tensor of shape {shape}, got "
            f"{x.dtype} on {x.device}, shape {tuple(x.shape)}, strides {x.stride()}"
        )


def check_width(name: str, width: int) -> None:
    if width % WIDTH_MULTIPLE:
        raise KernelArgumentError(f"{name}: width {width} is not a multiple of {WIDTH_MULTIPLE}")


def check_matrix(
    name: str, weight: torch.Tensor, bias: torch.Tensor | None, n: int, k: int
) -> bool:
    """Checks W (N, K), or packed (N / 16, K, 16), and its bias (N,) for the C code;
    returns whether W is packed."""
    packed = weight.dim() == 3
    if packed and n % PANEL:
        raise KernelArgumentError(f"{name}: a packed matrix has N a multiple of {PANEL}, not {n}")
    check_width(name, k)
    check_tensor(name, weight, (n // PANEL, k, PANEL) if packed else (n, k))
    if bias is not None:
        check_tensor(f"{name} bias", bias, (n,))
    return packed


def check_norm_weight(name: str, weight: torch.Tensor) -> int:
    """An RMSNorm weight (H,), H a multiple of the vector width; returns H."""
    if weight.dim() != 1:
        raise KernelArgumentError(f"{name}: expected (H,), got {tuple(weight.shape)}")
    width = weight.shape[0]
    check_width(name, width)
    check_tensor(name, weight, (width,))
    return width


def check_pool(name: str, pool: torch.Tensor, num_kv_heads: int, head_dim: int) -> None:
    """A layer's KV pool (2, nkv, NB, bs, hd), float32, contiguous."""
    if pool.dim() != 5:
        raise KernelArgumentError(f"{name}: expected (2, nkv, NB, bs, hd), got {tuple(pool.shape)}")
    _, _, num_blocks, block_size, _ = pool.shape
    check_tensor(name, pool, (2, num_kv_heads, num_blocks, block_size, head_dim))


def check_row_tables(
    row_seq: torch.Tensor, positions: torch.Tensor, block_tables: torch.Tensor, num_rows: int
) -> None:
    """What the native attention reads per row (native.NativeRows' tensors)."""
    check_tensor("row_seq", row_seq, (num_rows,), torch.int32)
    check_tensor("positions", positions, (num_rows,), torch.int32)
    if block_tables.dim() != 2:
        raise KernelArgumentError(f"block_tables: expected 2 dims, got {tuple(block_tables.shape)}")
    check_tensor("block_tables", block_tables, tuple(block_tables.shape), torch.int32)
