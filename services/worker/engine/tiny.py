"""The embedded default model `tiny`: Llama shape, seeded weights, byte-level tokenizer.

Weights come from a counter-based hash (splitmix64 over uint64 counters, in numpy),
mapped linearly to uniform values: only integer arithmetic and exactly rounded IEEE
operations, so every machine and process gets bit-identical weights, and any layer
range can be generated alone (each tensor has its own stream keyed by its name).
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import torch

from services.common.tokenizer import ByteTokenizer
from services.worker.engine.config import ModelConfig, RopeConfig
from services.worker.engine.sampling_params import splitmix64

TINY_SEED = 20240601

TINY_MODEL_CONFIG = ModelConfig(
    vocab_size=ByteTokenizer.vocab_size,
    hidden_size=256,
    intermediate_size=768,
    num_layers=4,
    num_heads=8,
    num_kv_heads=2,  # grouped-query attention, 4 query heads per KV head
    head_dim=32,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    rope=RopeConfig(theta=10000.0),
    tie_word_embeddings=False,
    bos_token_id=ByteTokenizer.bos_token_id,
    eos_token_ids=(ByteTokenizer.eos_token_id,),
)

_C1 = np.uint64(0x9E3779B97F4A7C15)
_C2 = np.uint64(0xBF58476D1CE4E5B9)
_C3 = np.uint64(0x94D049BB133111EB)


def _uniform(key: int, n: int) -> np.ndarray:
    """n float64 values uniform in [-1, 1), a pure function of (key, index)."""
    # Each key starts its counters at a far-apart 64-bit offset; uint64 arrays wrap mod 2**64.
    x = np.arange(n, dtype=np.uint64) + np.uint64(splitmix64(key))
    x = x + _C1
    x = (x ^ (x >> np.uint64(30))) * _C2
    x = (x ^ (x >> np.uint64(27))) * _C3
    x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) * (2.0 / (1 << 53)) - 1.0


def _tensor(name: str, shape: tuple[int, ...], std: float, mean: float = 0.0) -> torch.Tensor:
    key = (TINY_SEED << 32) | zlib.crc32(name.encode())
    values = (
        _uniform(key, math.prod(shape)) * (std * math.sqrt(3.0)) + mean
    )  # uniform with this std
    return torch.from_numpy(values.astype(np.float32).reshape(shape))


def tiny_hf_tensors(
    names: list[str], config: ModelConfig = TINY_MODEL_CONFIG
) -> dict[str, torch.Tensor]:
    """The tiny model's tensors under their Hugging Face names (float32)."""
    h, i = config.hidden_size, config.intermediate_size
    shapes: dict[str, tuple[tuple[int, ...], float]] = {
        "self_attn.q_proj.weight": ((config.q_size, h), 1 / math.sqrt(h)),
        "self_attn.k_proj.weight": ((config.kv_size, h), 1 / math.sqrt(h)),
        "self_attn.v_proj.weight": ((config.kv_size, h), 1 / math.sqrt(h)),
        "self_attn.o_proj.weight": ((h, config.q_size), 1 / math.sqrt(config.q_size)),
        "mlp.gate_proj.weight": ((i, h), 1 / math.sqrt(h)),
        "mlp.up_proj.weight": ((i, h), 1 / math.sqrt(h)),
        "mlp.down_proj.weight": ((h, i), 1 / math.sqrt(i)),
    }
    tensors = {}
    for name in names:
        if name == "model.embed_tokens.weight":
            tensors[name] = _tensor(name, (config.vocab_size, h), std=1.0)
        elif name == "lm_head.weight":
            tensors[name] = _tensor(name, (config.vocab_size, h), std=1 / math.sqrt(h))
        elif name.endswith("norm.weight"):  # RMSNorm gains around 1
            tensors[name] = _tensor(name, (h,), std=0.1, mean=1.0)
        else:
            suffix = name.split(".", 3)[3]  # model.layers.{i}.<suffix>
            shape, std = shapes[suffix]
            tensors[name] = _tensor(name, shape, std=std)
    return tensors
