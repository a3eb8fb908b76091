"""A Llama-architecture decoder in plain torch (RMSNorm, RoPE, GQA, SwiGLU).

The model holds a contiguous layer range [layer_start, layer_end) of the full model
(all of it by default). The embedding lives with the first stage, the final norm and
lm_head with the last:

    token ids --embed--> hidden --layers[start:end)--> hidden --norm, lm_head--> logits
               (start == 0 only)                              (end == num_layers only)

Attention is passed in as a function, so the same layers run over the paged KV cache
(attention.py) or over a whole sequence with no cache (`forward_dense`, the reference
the tests compare against). The layers are batch-invariant (see `linear`, `silu`,
attention.py and docs/engine.md, "Batch invariance"): a row's result never depends on
the other rows. Shapes: T = tokens in the flat batch, H = hidden size, nh / nkv =
query / KV heads, hd = head dim, V = vocab.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from services.worker.engine import native
from services.worker.engine.config import ModelConfig
from services.worker.engine.errors import EngineStateError
from services.worker.engine.stage_weights import StageWeights

# attention(layer_idx, q (T, nh, hd), k (T, nkv, hd), v (T, nkv, hd)) -> (T, nh * hd)
AttentionFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# LayerWeights matrices that native kernels keep packed ((N / 16, K, 16), native.py).
PACKED_FIELDS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


# F.linear over fewer rows than this takes other MKL code paths (other summation orders)
# than over more: pad to it so a row's result never depends on the batch.
MIN_GEMM_ROWS = 16


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear whose output rows are batch-invariant: the same bits for a row whatever
    the other rows and the row's place among them.

    Measured on this machine's MKL (tests/unit/worker/engine/test_batch_invariance.py):
    from MIN_GEMM_ROWS rows on, fp32 and bf16 row results are identical for every row
    count; below, small-M paths kick in (up to 11 rows differ at 256 inputs, up to 15 at
    768 to 14336). With 2+ threads and 1024+ inputs, MKL also splits the sum across
    threads for some row counts, which this does not cover (the tiny model's widths are
    256 and 768).
    """
    num_rows = x.shape[0]
    if num_rows >= MIN_GEMM_ROWS:
        return F.linear(x, weight, bias)
    padded = x.new_zeros(MIN_GEMM_ROWS, x.shape[1])
    padded[:num_rows] = x
    return F.linear(padded, weight, bias)[:num_rows]


def silu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(x), computed as x / (1 + exp(-x)). F.silu's vectorised loop and its
    scalar loop (a tensor's tail, a thread's share) round differently, so an element's
    result would depend on where it falls; exp, add and div do not (measured)."""
    denominator = torch.neg(x).exp_().add_(1)
    return torch.div(x, denominator, out=denominator)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32:  # the fused kernel gives HF's float32 result bit for bit
        return F.rms_norm(x, weight.shape, weight, eps)
    # Same op order as HF LlamaRMSNorm: normalise in float32, cast back, then scale.
    x_float = x.float()
    variance = x_float.pow(2).mean(-1, keepdim=True)
    return weight * (x_float * torch.rsqrt(variance + eps)).to(x.dtype)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """(hd/2,) float32 inverse frequencies, computed exactly as transformers does."""
    rope, dim = config.rope, config.head_dim
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if rope.rope_type == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.rope_type == "llama3":
        old_context_len = rope.original_max_position_embeddings
        low_freq_wavelen = old_context_len / rope.low_freq_factor
        high_freq_wavelen = old_context_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_context_len / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        inv_freq = torch.where(is_medium, smoothed, scaled)
    return inv_freq


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (T, heads, hd); cos, sin (T, 1, hd/2). HF's rotate_half convention."""
    x1, x2 = x.chunk(2, dim=-1)  # (T, heads, hd/2) each
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class LlamaModel:
    def __init__(self, config: ModelConfig, weights: StageWeights, kernels: str = "torch") -> None:
        """kernels: "native" runs matmuls, norms, RoPE and the SwiGLU activation through
        the native kernels (native.py; float32 on CPU only: the engine decides, see
        EngineConfig.kernels), "torch" through torch ops."""
        self.config = config
        self.kernels = kernels
        self.set_weights(weights)
        self.scale = config.head_dim**-0.5
        any_tensor = weights.tensors()[0]
        self.dtype: torch.dtype = any_tensor.dtype
        self.device: torch.device = any_tensor.device
        # Computed on the CPU as transformers does, then kept where the steps run.
        self.inv_freq = rope_inv_freq(config).to(self.device)

    def set_weights(self, weights: StageWeights) -> None:
        """Holds `weights` from now on (a layer range dropped or restored). Under the
        native kernels the layer matrices are packed once, in place of the (N, K)
        originals (a matrix packed already stays as it is)."""
        if self.kernels == "native":
            for layer in weights.layers.values():
                for field in PACKED_FIELDS:
                    value = getattr(layer, field)
                    if value.dim() == 2 and value.shape[0] % native.PANEL == 0:
                        setattr(layer, field, native.pack_weight(value))
        self.weights = weights
        self._native_stack: native.NativeLayers | None = None  # built on the first native step

    # ---- which part of the model this is -------------------------------------------

    @property
    def layer_start(self) -> int:
        return self.weights.layer_start

    @property
    def layer_end(self) -> int:
        return self.weights.layer_end

    @property
    def is_first_stage(self) -> bool:
        return self.weights.layer_start == 0

    @property
    def is_last_stage(self) -> bool:
        return self.weights.layer_end == self.config.num_layers

    @property
    def is_complete(self) -> bool:
        return self.is_first_stage and self.is_last_stage

    def nbytes(self) -> int:
        return self.weights.nbytes()

    # ---- forward pieces -------------------------------------------------------------

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """(T,) int64 -> (T, H)."""
        if self.weights.embed_tokens is None:
            raise EngineStateError("only the first stage embeds")
        return F.embedding(token_ids, self.weights.embed_tokens)

    def rope_cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(T,) int64 positions -> cos, sin (T, 1, hd/2) in the model dtype."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # (T, hd/2)
        return freqs.cos().to(self.dtype)[:, None, :], freqs.sin().to(self.dtype)[:, None, :]

    def forward_layers(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        attention: AttentionFn,
        layer_start: int | None = None,
        layer_end: int | None = None,
        paged_kv: native.PagedKV | None = None,
    ) -> torch.Tensor:
        """Runs layers [layer_start, layer_end) (default: all held) on hidden (T, H).

        paged_kv (native kernels only): this step over the paged KV pool, so that the
        whole range runs in one native call (native.NativeLayers) instead of op by op
        through `attention`."""
        layer_start = self.layer_start if layer_start is None else layer_start
        layer_end = self.layer_end if layer_end is None else layer_end
        if not self.layer_start <= layer_start <= layer_end <= self.layer_end:
            raise ValueError(
                f"layers [{layer_start}, {layer_end}) are not all held; this model holds "
                f"[{self.layer_start}, {self.layer_end})"
            )
        cos, sin = self.rope_cos_sin(positions)
        if self.kernels == "native":
            return self._native_layers(
                layer_start, layer_end, hidden, cos, sin, attention, paged_kv
            )
        for layer_idx in range(layer_start, layer_end):
            hidden = self._layer(layer_idx, hidden, cos, sin, attention)
        return hidden

    def _native_layers(
        self,
        layer_start: int,
        layer_end: int,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attention: AttentionFn,
        paged_kv: native.PagedKV | None,
    ) -> torch.Tensor:
        """`_layer` over [layer_start, layer_end) with the native kernels: the same math,
        matmuls included (native.linear: no padding needed, every row is computed alone),
        each residual add fused with the norm after it (hidden is updated in place).
        Given the paged KV pool (`paged_kv`) the whole range is one native call
        (native.NativeLayers); without it (the dense reference) it goes op by op
        through `attention`, with the same bits."""
        if layer_start == layer_end:
            return hidden
        c, layers = self.config, self.weights.layers
        eps, heads = c.rms_norm_eps, c.num_heads + c.num_kv_heads
        num_tokens = hidden.shape[0]
        cos, sin = cos.view(num_tokens, -1), sin.view(num_tokens, -1)
        hidden = hidden.clone(memory_format=torch.contiguous_format)  # not the caller's
        if paged_kv is not None:
            if self._native_stack is None:
                self._native_stack = native.NativeLayers(c, layers)
            self._native_stack.run(
                hidden, layer_start, layer_end, paged_kv.pools, cos, sin,
                paged_kv.slot_mapping, paged_kv.rows,
            )  # fmt: skip
            return hidden
        x = native.rms_norm(hidden, layers[layer_start].input_norm, eps)
        for layer_idx in range(layer_start, layer_end):
            w = layers[layer_idx]
            qkv = native.linear(x, w.qkv_proj, w.qkv_bias)  # (T, q_size + 2 kv_size)
            native.rope_(qkv, heads, c.head_dim, cos, sin)  # q's and k's heads, in place
            q = qkv[:, : c.q_size].view(num_tokens, c.num_heads, c.head_dim)
            k = qkv[:, c.q_size : c.q_size + c.kv_size].view(num_tokens, c.num_kv_heads, c.head_dim)
            v = qkv[:, c.q_size + c.kv_size :].view(num_tokens, c.num_kv_heads, c.head_dim)
            attn = attention(layer_idx, q, k, v)  # (T, nh * hd)
            native.add_rms_norm_(
                hidden, native.linear(attn, w.o_proj, w.o_bias), w.post_attention_norm, eps, x
            )
            act = native.silu_mul(native.linear(x, w.gate_up_proj, w.gate_up_bias))  # (T, I)
            down = native.linear(act, w.down_proj, w.down_bias)
            if layer_idx + 1 < layer_end:
                native.add_rms_norm_(hidden, down, layers[layer_idx + 1].input_norm, eps, x)
            else:
                hidden += down
        return hidden

    def _layer(
        self,
        layer_idx: int,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attention: AttentionFn,
    ) -> torch.Tensor:
        c, w = self.config, self.weights.layers[layer_idx]
        num_tokens = hidden.shape[0]
        x = rms_norm(hidden, w.input_norm, c.rms_norm_eps)
        qkv = linear(x, w.qkv_proj, w.qkv_bias)  # (T, q_size + 2 kv_size)
        # q and k sit side by side in each row: rotate both heads' sets in one go.
        qk = qkv[:, : c.q_size + c.kv_size].view(
            num_tokens, c.num_heads + c.num_kv_heads, c.head_dim
        )
        qk = apply_rope(qk, cos, sin)  # (T, nh + nkv, hd)
        q, k = qk[:, : c.num_heads], qk[:, c.num_heads :]  # (T, nh, hd), (T, nkv, hd)
        v = qkv[:, c.q_size + c.kv_size :].view(
            num_tokens, c.num_kv_heads, c.head_dim
        )  # (T, nkv, hd)
        attn = attention(layer_idx, q, k, v)  # (T, nh * hd)
        hidden = hidden + linear(attn, w.o_proj, w.o_bias)
        x = rms_norm(hidden, w.post_attention_norm, c.rms_norm_eps)
        gate, up = linear(x, w.gate_up_proj, w.gate_up_bias).chunk(2, dim=-1)  # (T, I) each
        act = silu(gate).mul_(up)  # (T, I), contiguous
        return hidden + linear(act, w.down_proj, w.down_bias)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(R, H) last-layer hidden states -> (R, V) float32 logits."""
        if self.weights.norm is None or self.weights.lm_head is None:
            raise EngineStateError("only the last stage computes logits")
        if self.kernels == "native":
            x = native.rms_norm(hidden, self.weights.norm, self.config.rms_norm_eps)
            return native.linear(x, self.weights.lm_head)
        x = rms_norm(hidden, self.weights.norm, self.config.rms_norm_eps)
        return linear(x, self.weights.lm_head).float()

    # ---- reference path -------------------------------------------------------------

    def forward_dense(self, token_ids: list[int]) -> torch.Tensor:
        """Logits (T, V) for every position of one sequence, plain causal attention, no
        cache. The reference the paged engine must match token for token."""
        if not self.is_complete:
            raise EngineStateError("the dense reference needs the whole model")
        ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        positions = torch.arange(len(token_ids), device=self.device)
        hidden = self.forward_layers(self.embed(ids), positions, self.dense_attention)
        return self.compute_logits(hidden)

    def dense_attention(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """Causal attention over one whole sequence: q (T, nh, hd), k, v (T, nkv, hd)."""
        del layer_idx
        num_tokens, group = q.shape[0], self.config.num_queries_per_kv
        k = k.repeat_interleave(group, dim=1)  # (T, nh, hd)
        v = v.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1),
            k.transpose(0, 1),
            v.transpose(0, 1),
            is_causal=True,
            scale=self.scale,
        )  # (nh, T, hd)
        return out.transpose(0, 1).reshape(num_tokens, -1)  # (T, nh * hd)
