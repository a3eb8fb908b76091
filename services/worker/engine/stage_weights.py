"""The tensors a model (or a pipeline stage of it) holds, in the engine's fused layout.

Plain containers: weights.py fills them from checkpoint tensors, model.py runs them,
native.py points the C kernels at them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class LayerWeights:
    """One decoder layer, with q/k/v and gate/up fused into single matmuls. Under the
    native kernels the four matrices are held packed, (N / 16, K, 16) (same bytes)."""

    input_norm: torch.Tensor  # (H,)
    qkv_proj: torch.Tensor  # (q_size + 2 * kv_size, H): rows q, then k, then v
    o_proj: torch.Tensor  # (H, q_size)
    post_attention_norm: torch.Tensor  # (H,)
    gate_up_proj: torch.Tensor  # (2 * I, H): rows gate, then up
    down_proj: torch.Tensor  # (H, I)
    qkv_bias: torch.Tensor | None = None
    o_bias: torch.Tensor | None = None
    gate_up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (getattr(self, f.name) for f in fields(self)) if t is not None]


@dataclass
class StageWeights:
    """The weights a stage holding layers [layer_start, layer_end) keeps."""

    layer_start: int
    layer_end: int
    layers: dict[int, LayerWeights]
    embed_tokens: torch.Tensor | None  # (V, H), first stage only
    norm: torch.Tensor | None  # (H,), last stage only
    lm_head: torch.Tensor | None  # (V, H), last stage only; may be embed_tokens (tied)

    def tensors(self) -> list[torch.Tensor]:
        tensors = [t for layer in self.layers.values() for t in layer.tensors()]
        return tensors + [t for t in (self.embed_tokens, self.norm, self.lm_head) if t is not None]

    def nbytes(self) -> int:
        """Bytes held, counting a tensor shared by two names (tied lm_head) once."""
        unique = {t.data_ptr(): t.numel() * t.element_size() for t in self.tensors()}
        return sum(unique.values())
