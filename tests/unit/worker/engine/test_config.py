from __future__ import annotations

import pytest

from services.worker.engine import EngineConfig, ModelConfig, RopeConfig

HF_BASE = {
    "model_type": "llama",
    "vocab_size": 100,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "eos_token_id": [2, 7],
}


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("block_size", 0, "block_size must be an int > 0, got 0"),
        ("dtype", "int8", "dtype 'int8' is not one of"),
        ("memory_capacity_bytes", -1, "memory_capacity_bytes must be an int > 0, got -1"),
        ("num_kv_blocks", 0, "num_kv_blocks must be None or an int > 0, got 0"),
        ("max_num_seqs", 0, "max_num_seqs must be an int > 0, got 0"),
        ("max_num_batched_tokens", 1.5, "max_num_batched_tokens must be an int > 0, got 1.5"),
        ("max_model_len", -4, "max_model_len must be None or an int > 0, got -4"),
        ("scheduling_policy", "lifo", "scheduling_policy 'lifo' is not one of"),
        ("device", "tpu", "device must be 'cpu', 'cuda' or 'cuda:N', got 'tpu'"),
        ("device", "cuda:x", "device must be 'cpu', 'cuda' or 'cuda:N', got 'cuda:x'"),
        ("device", "cudax", "device must be 'cpu', 'cuda' or 'cuda:N', got 'cudax'"),
        ("model", "", "model must be 'tiny' or a path"),
    ],
)
def test_engine_config_names_the_bad_value(field, value, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(**{field: value})


@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_native_kernels_on_a_gpu_are_refused_naming_both(device):
    from services.common.config import ConfigError

    with pytest.raises(
        ConfigError, match=f"kernels 'native' run on the CPU only, not device '{device}'"
    ):
        EngineConfig(kernels="native", device=device)
    assert EngineConfig(kernels="auto", device=device).device == device  # auto picks torch
    assert EngineConfig(kernels="torch", device=device).kernels == "torch"


def test_memory_that_cannot_hold_the_weights_is_refused():
    from services.worker.engine import LLMEngine

    with pytest.raises(
        ValueError, match="memory_capacity_bytes=1000000 leaves no room for a KV block"
    ):
        LLMEngine.from_config(EngineConfig(memory_capacity_bytes=1_000_000))
    with pytest.raises(ValueError, match="cannot hold .* plus num_kv_blocks=100000"):
        LLMEngine.from_config(EngineConfig(memory_capacity_bytes=16 * 2**20, num_kv_blocks=100_000))
    with pytest.raises(ValueError, match="max_model_len=4096 exceeds the model's context of 2048"):
        LLMEngine.from_config(EngineConfig(max_model_len=4096))


def test_transformers_5_rope_parameters():
    config = ModelConfig.from_hf_dict(
        {**HF_BASE, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}
    )
    assert config.rope == RopeConfig(theta=5e5)
    assert (config.head_dim, config.num_queries_per_kv, config.eos_token_ids) == (8, 2, (2, 7))


def test_transformers_4_rope_theta_and_scaling():
    config = ModelConfig.from_hf_dict(
        {**HF_BASE, "rope_theta": 1e4, "rope_scaling": {"type": "linear", "factor": 2.0}}
    )
    assert config.rope == RopeConfig(theta=1e4, rope_type="linear", factor=2.0)


def test_unsupported_rope_and_shapes_are_refused():
    with pytest.raises(ValueError, match="rope_type 'yarn' is not supported"):
        ModelConfig.from_hf_dict(
            {**HF_BASE, "rope_parameters": {"rope_type": "yarn", "factor": 2.0}}
        )
    with pytest.raises(
        ValueError, match=r"num_heads \(4\) must be a multiple of num_kv_heads \(3\)"
    ):
        ModelConfig.from_hf_dict({**HF_BASE, "num_key_value_heads": 3})


def test_mistral_sliding_window_caps_the_context():
    config = ModelConfig.from_hf_dict({**HF_BASE, "model_type": "mistral", "sliding_window": 128})
    assert config.max_context_len == 128
    assert (
        ModelConfig.from_hf_dict(
            {**HF_BASE, "model_type": "mistral", "sliding_window": None}
        ).max_context_len
        == 512
    )


def test_to_hf_dict_round_trips():
    config = ModelConfig.from_hf_dict(
        {**HF_BASE, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}
    )
    assert ModelConfig.from_hf_dict(config.to_hf_dict()) == config
