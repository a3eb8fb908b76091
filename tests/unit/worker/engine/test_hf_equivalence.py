"""Greedy tokens equal Hugging Face transformers' exactly (fp32, CPU) on checkpoints
these tests build themselves: Llama (sharded, GQA, tied, biases, llama3 RoPE) and Mistral."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from services.worker.engine import SamplingParams  # noqa: E402
from services.worker.engine.tiny import TINY_MODEL_CONFIG  # noqa: E402
from services.worker.engine.weights import to_hf_tensors  # noqa: E402
from tests.unit.worker.engine.helpers import random_prompts  # noqa: E402

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paged attention",
    "a",
    "llmesh migrates requests " * 6,
]
BOS, EOS = 0, 1


def build_tokenizer(path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(TEXTS * 20, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", BOS)]
    )
    tokenizer.save(str(path / "tokenizer.json"))


COMMON = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=8,
    max_position_embeddings=256,
    bos_token_id=BOS,
    eos_token_id=EOS,
    initializer_range=0.1,
)

CHECKPOINTS = {
    "llama_gqa_sharded": ("llama", dict(num_key_value_heads=2, rope_theta=500000.0), "40KB"),
    "llama_tied_bias_llama3_rope": (
        "llama",
        dict(
            num_key_value_heads=8,
            tie_word_embeddings=True,
            attention_bias=True,
            mlp_bias=True,
            rms_norm_eps=1e-5,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
        None,
    ),
    "mistral": ("mistral", dict(num_key_value_heads=4, sliding_window=None, head_dim=16), None),
}


def hf_greedy(model, prompt: list[int], max_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_tokens,
            do_sample=False,
            pad_token_id=EOS,
        )
    tokens = out[0, len(prompt) :].tolist()
    return tokens[: tokens.index(EOS) + 1] if EOS in tokens else tokens


@pytest.fixture(scope="module", params=sorted(CHECKPOINTS))
def checkpoint(request, tmp_path_factory):
    name = request.param
    model_type, extra, max_shard_size = CHECKPOINTS[name]
    config_cls = transformers.MistralConfig if model_type == "mistral" else transformers.LlamaConfig
    model_cls = (
        transformers.MistralForCausalLM
        if model_type == "mistral"
        else transformers.LlamaForCausalLM
    )
    torch.manual_seed(0)
    model = model_cls(config_cls(**COMMON, **extra)).eval()
    path = tmp_path_factory.mktemp(name)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    build_tokenizer(path)
    return name, path, model


def test_greedy_tokens_equal_transformers(make_engine, checkpoint):
    name, path, hf_model = checkpoint
    if name == "llama_gqa_sharded":
        assert (path / "model.safetensors.index.json").is_file()
        assert (
            len(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]) > 10
        )
    engine = make_engine(model=str(path), block_size=4, num_kv_blocks=40, max_num_batched_tokens=16)
    prompts = [engine.tokenizer.encode(text) for text in TEXTS] + random_prompts(
        5, 4, 1, 60, vocab_size=320
    )
    assert prompts[0][0] == BOS
    outputs = engine.generate(prompts, SamplingParams(max_tokens=24))
    for prompt, out in zip(prompts, outputs, strict=True):
        assert out.new_token_ids == hf_greedy(hf_model, prompt, 24), f"{name}: prompt {prompt[:8]}"
    assert engine.stats().num_preemptions > 0  # 40 blocks of 4 cannot hold all 8 at once


def test_text_round_trip_through_tokenizer_json(make_engine, checkpoint):
    _, path, _ = checkpoint
    engine = make_engine(model=str(path), num_kv_blocks=8)
    ids = engine.tokenizer.encode(TEXTS[0])
    assert engine.tokenizer.decode(ids) == TEXTS[0]
    assert engine.eos_token_id == EOS


def test_restore_dropped_layers_from_the_checkpoint(make_engine, checkpoint):
    name, path, hf_model = checkpoint
    engine = make_engine(model=str(path), num_kv_blocks=40, block_size=4)
    weight_bytes = engine.weight_nbytes
    prompt = engine.tokenizer.encode(TEXTS[1])
    engine.layer_ranges.drop_layers(
        2, 4
    )  # last stage: a tied lm_head keeps its own copy of the embedding
    engine.layer_ranges.restore_layers()
    assert engine.weight_nbytes == weight_bytes
    assert engine.generate([prompt], SamplingParams(max_tokens=16))[0].new_token_ids == hf_greedy(
        hf_model, prompt, 16
    )


def test_tiny_model_is_a_true_llama(make_engine):
    engine = make_engine(num_kv_blocks=64)
    hf_model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**TINY_MODEL_CONFIG.to_hf_dict())
    ).eval()
    missing, unexpected = hf_model.load_state_dict(
        to_hf_tensors(TINY_MODEL_CONFIG, engine.model.weights), strict=False
    )
    assert (missing, unexpected) == ([], [])
    prompts = random_prompts(9, 4, 1, 50)
    for prompt, out in zip(
        prompts,
        engine.generate(prompts, SamplingParams(max_tokens=16, ignore_eos=True)),
        strict=True,
    ):
        with torch.inference_mode():
            ids = torch.tensor([prompt])
            hf = hf_model.generate(
                ids,
                attention_mask=torch.ones_like(
                    ids
                ),  # else HF takes id 0 (pad) in the prompt for padding
                max_new_tokens=16,
                do_sample=False,
                pad_token_id=0,
                eos_token_id=None,
            )
        assert out.new_token_ids == hf[0, len(prompt) :].tolist()


def test_unsupported_checkpoints_are_refused(make_engine, tmp_path):
    config = transformers.LlamaConfig(**COMMON, hidden_act="gelu")
    config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="hidden_act 'gelu' is not supported"):
        make_engine(model=str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({**COMMON, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        make_engine(model=str(tmp_path))
    with pytest.raises(ValueError, match="neither 'tiny' nor a checkpoint directory"):
        make_engine(model=str(tmp_path / "nowhere"))
