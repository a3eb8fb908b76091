"""Synthetic Hugging Face checkpoints for benchmarks: any Llama shape, no download.

Weights come from the tiny model's counter-based generator (deterministic for a given
shape), saved as safetensors with a config.json and a byte-level tokenizer.json, so the
engine loads them through its real checkpoint path.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from services.worker.engine.config import ModelConfig, RopeConfig
from services.worker.engine.tiny import tiny_hf_tensors
from services.worker.engine.weights import hf_names

BOS, EOS = 256, 257


def llama_config(
    num_layers: int,
    hidden_size: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    intermediate_size: int,
    max_position_embeddings: int,
) -> ModelConfig:
    return ModelConfig(
        vocab_size=258,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5,
        rope=RopeConfig(theta=10000.0),
        tie_word_embeddings=False,
        bos_token_id=BOS,
        eos_token_ids=(EOS,),
    )


def write_checkpoint(path: Path, config: ModelConfig) -> Path:
    """Writes config.json, model.safetensors and tokenizer.json into path (if missing)."""
    path.mkdir(parents=True, exist_ok=True)
    if (path / "model.safetensors").exists():
        return path
    hf_config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope.theta,
        "tie_word_embeddings": False,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    }
    (path / "config.json").write_text(json.dumps(hf_config, indent=2))
    tensors = tiny_hf_tensors(hf_names(config, 0, config.num_layers), config)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    _write_byte_tokenizer(path / "tokenizer.json")
    return path


def _write_byte_tokenizer(file: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    vocab["<s>"], vocab["</s>"] = BOS, EOS
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<s>", "</s>"])
    tokenizer.save(str(file))
