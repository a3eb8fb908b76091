"""Where weights come from, and the Hugging Face name mapping (in this one place).

A WeightSource hands out tensors under their HF names, for any subset (so a stage, or
a restore of dropped layers, reads only what it needs). build_stage_weights fuses
them into the model's layout (q/k/v -> qkv_proj, gate/up -> gate_up_proj).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import torch

from services.worker.engine import native
from services.worker.engine.config import ModelConfig
from services.worker.engine.dtypes import TORCH_DTYPES
from services.worker.engine.stage_weights import LayerWeights, StageWeights
from services.worker.engine.staging import device_staging, is_cuda
from services.worker.engine.tiny import TINY_MODEL_CONFIG, tiny_hf_tensors

EMBED_NAME = "model.embed_tokens.weight"
NORM_NAME = "model.norm.weight"
LM_HEAD_NAME = "lm_head.weight"

# LayerWeights field -> HF names under "model.layers.{i}.", concatenated along dim 0.
_LAYER_FIELDS: dict[str, tuple[str, ...]] = {
    "input_norm": ("input_layernorm.weight",),
    "qkv_proj": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "o_proj": ("self_attn.o_proj.weight",),
    "post_attention_norm": ("post_attention_layernorm.weight",),
    "gate_up_proj": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "down_proj": ("mlp.down_proj.weight",),
}
_ATTENTION_BIAS_FIELDS: dict[str, tuple[str, ...]] = {
    "qkv_bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    "o_bias": ("self_attn.o_proj.bias",),
}
_MLP_BIAS_FIELDS: dict[str, tuple[str, ...]] = {
    "gate_up_bias": ("mlp.gate_proj.bias", "mlp.up_proj.bias"),
    "down_bias": ("mlp.down_proj.bias",),
}


def _layer_fields(config: ModelConfig) -> dict[str, tuple[str, ...]]:
    fields = dict(_LAYER_FIELDS)
    if config.attention_bias:
        fields.update(_ATTENTION_BIAS_FIELDS)
    if config.mlp_bias:
        fields.update(_MLP_BIAS_FIELDS)
    return fields


def hf_names(config: ModelConfig, layer_start: int, layer_end: int) -> list[str]:
    """HF tensor names a stage holding layers [layer_start, layer_end) needs."""
    names = []
    if layer_start == 0:
        names.append(EMBED_NAME)
    for i in range(layer_start, layer_end):
        names += [
            f"model.layers.{i}.{n}" for parts in _layer_fields(config).values() for n in parts
        ]
    if layer_end == config.num_layers:
        names.append(NORM_NAME)
        if config.tie_word_embeddings:
            if layer_start != 0:
                names.append(EMBED_NAME)
        else:
            names.append(LM_HEAD_NAME)
    return names


def _fused(
    tensors: Mapping[str, torch.Tensor], names: list[str], dtype: str, device: str
) -> torch.Tensor:
    missing = [n for n in names if n not in tensors]
    if missing:
        raise ValueError(f"checkpoint lacks tensors {missing}")
    parts = [_placed(tensors[n].to(dtype=TORCH_DTYPES[dtype]), device) for n in names]
    return parts[0].contiguous() if len(parts) == 1 else torch.cat(parts, dim=0)


def _placed(tensor: torch.Tensor, device: str) -> torch.Tensor:
    """tensor on `device`; host tensors reach a GPU through the staging buffers (a load,
    a restore of dropped layers: staging.py)."""
    if is_cuda(device) and tensor.device.type == "cpu":
        return device_staging(device).copy_to_device(tensor.contiguous())
    return tensor.to(device)


def build_layer_weights(
    config: ModelConfig,
    tensors: Mapping[str, torch.Tensor],
    layer_idx: int,
    dtype: str,
    device: str,
) -> LayerWeights:
    """Fuses layer layer_idx's HF tensors into the model layout, in `dtype` on `device`."""
    return LayerWeights(
        **{
            field: _fused(tensors, [f"model.layers.{layer_idx}.{n}" for n in parts], dtype, device)
            for field, parts in _layer_fields(config).items()
        }
    )


def build_embedding(tensors: Mapping[str, torch.Tensor], dtype: str, device: str) -> torch.Tensor:
    return _fused(tensors, [EMBED_NAME], dtype, device)


def build_head(
    config: ModelConfig,
    tensors: Mapping[str, torch.Tensor],
    dtype: str,
    device: str,
    embed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(final norm, lm_head); a tied lm_head is `embed` when given, else its own copy."""
    norm = _fused(tensors, [NORM_NAME], dtype, device)
    if not config.tie_word_embeddings:
        return norm, _fused(tensors, [LM_HEAD_NAME], dtype, device)
    return norm, embed if embed is not None else build_embedding(tensors, dtype, device)


def build_stage_weights(
    config: ModelConfig,
    tensors: Mapping[str, torch.Tensor],
    layer_start: int,
    layer_end: int,
    dtype: str,
    device: str,
) -> StageWeights:
    """The weights of a stage holding layers [layer_start, layer_end), from HF tensors."""
    layers = {
        i: build_layer_weights(config, tensors, i, dtype, device)
        for i in range(layer_start, layer_end)
    }
    embed = build_embedding(tensors, dtype, device) if layer_start == 0 else None
    norm = lm_head = None
    if layer_end == config.num_layers:
        norm, lm_head = build_head(config, tensors, dtype, device, embed)
    return StageWeights(layer_start, layer_end, layers, embed, norm, lm_head)


def to_hf_tensors(config: ModelConfig, weights: StageWeights) -> dict[str, torch.Tensor]:
    """Splits the fused layout back into HF names (views, no copies; a weight the native
    kernels packed, (N / 16, K, 16), is unpacked: a copy)."""
    split_sizes = {
        "qkv_proj": [config.q_size, config.kv_size, config.kv_size],
        "qkv_bias": [config.q_size, config.kv_size, config.kv_size],
        "gate_up_proj": [config.intermediate_size] * 2,
        "gate_up_bias": [config.intermediate_size] * 2,
    }
    tensors: dict[str, torch.Tensor] = {}
    for i, layer in weights.layers.items():
        for field, parts in _layer_fields(config).items():
            value = getattr(layer, field)
            value = native.unpack_weight(value)  # (N, K) as it is; packed panels copied back
            pieces = value.split(split_sizes[field], dim=0) if field in split_sizes else (value,)
            for name, piece in zip(parts, pieces, strict=True):
                tensors[f"model.layers.{i}.{name}"] = piece
    if weights.embed_tokens is not None:
        tensors[EMBED_NAME] = weights.embed_tokens
    if weights.norm is not None:
        tensors[NORM_NAME] = weights.norm
    if weights.lm_head is not None and not config.tie_word_embeddings:
        tensors[LM_HEAD_NAME] = weights.lm_head
    return tensors


class WeightSource(Protocol):
    def load(self, names: list[str]) -> dict[str, torch.Tensor]: ...


class TinyWeightSource:
    """The embedded tiny model: weights are regenerated, bit-identical, on demand."""

    config = TINY_MODEL_CONFIG

    def load(self, names: list[str]) -> dict[str, torch.Tensor]:
        return tiny_hf_tensors(names, self.config)


class CheckpointWeightSource:
    """*.safetensors in an HF checkpoint directory, sharded (with an index) or not."""

    def __init__(self, path: str | Path) -> None:
        from safetensors import safe_open

        self._safe_open = safe_open
        self.path = Path(path)
        index_file = self.path / "model.safetensors.index.json"
        self.file_of: dict[str, Path] = {}
        if index_file.is_file():
            weight_map = json.loads(index_file.read_text())["weight_map"]
            self.file_of = {name: self.path / file for name, file in weight_map.items()}
        else:
            for file in sorted(self.path.glob("*.safetensors")):
                with safe_open(str(file), framework="pt") as f:
                    self.file_of.update({name: file for name in f.keys()})  # noqa: SIM118
        if not self.file_of:
            raise ValueError(
                f"model {str(self.path)!r}: no *.safetensors weights in that directory"
            )

    def load(self, names: list[str]) -> dict[str, torch.Tensor]:
        by_file: dict[Path, list[str]] = {}
        for name in names:
            if name in self.file_of:
                by_file.setdefault(self.file_of[name], []).append(name)
        tensors = {}
        for file, file_names in by_file.items():
            with self._safe_open(str(file), framework="pt") as f:
                for name in file_names:
                    tensors[name] = f.get_tensor(name)
        return tensors
