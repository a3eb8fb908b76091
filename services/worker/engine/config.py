"""Frozen configuration dataclasses for the engine: the model's shape and the engine's knobs.

Torch-free on purpose: the simulator builds accounting-only engines from these without
touching tensors.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.common.config import ENV, ConfigError, require

MiB = 1024 * 1024

# Element size of every dtype the engine can hold weights and KV in.
DTYPE_NBYTES: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2}

SCHEDULING_POLICIES = ("fcfs", "priority")
# Which kernels run the model (matmuls, attention, norms, RoPE, SwiGLU, KV writes).
# "native": the compiled kernels (kernels/*.c; float32 on CPU, widths multiples of 8);
# "torch": torch ops (any dtype and device, no compiler); "auto": native where they
# apply and build, else torch.
KERNELS = ("auto", "native", "torch")
ROPE_TYPES = ("default", "linear", "llama3")
# HF `model_type`s whose math is exactly Llama's (Mistral only without a sliding window
# shorter than the context; see ModelConfig.max_context_len).
SUPPORTED_MODEL_TYPES = ("llama", "mistral")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters (HF `rope_parameters`, or `rope_theta` + `rope_scaling`)."""

    theta: float = 10000.0  # base wavelength
    rope_type: str = "default"  # one of ROPE_TYPES
    factor: float = 1.0  # linear / llama3 scaling factor
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int = 8192  # llama3 only

    def __post_init__(self) -> None:
        require(self.theta > 0, f"rope theta must be > 0, got {self.theta!r}")
        require(
            self.rope_type in ROPE_TYPES,
            f"rope_type {self.rope_type!r} is not supported; choose from {ROPE_TYPES}",
        )
        require(self.factor > 0, f"rope factor must be > 0, got {self.factor!r}")
        if self.rope_type == "llama3":
            require(
                self.high_freq_factor > self.low_freq_factor,
                f"llama3 rope needs high_freq_factor > low_freq_factor, got "
                f"{self.high_freq_factor!r} <= {self.low_freq_factor!r}",
            )


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a Llama-architecture decoder (field names follow nanoGPT/vLLM, not HF)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int  # SwiGLU inner width
    num_layers: int
    num_heads: int  # query heads
    num_kv_heads: int  # key/value heads (grouped-query attention when < num_heads)
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope: RopeConfig = RopeConfig()
    tie_word_embeddings: bool = False  # lm_head shares the embedding matrix
    attention_bias: bool = False  # q/k/v/o projections have biases
    mlp_bias: bool = False  # gate/up/down projections have biases
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()  # any of these ends generation (unless ignore_eos)
    sliding_window: int | None = None  # Mistral: the context is capped to it (same math below it)
    model_type: str = "llama"

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            require(
                isinstance(value, int) and value > 0, f"{name} must be an int > 0, got {value!r}"
            )
        require(
            self.num_heads % self.num_kv_heads == 0,
            f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})",
        )
        require(self.head_dim % 2 == 0, f"head_dim must be even for RoPE, got {self.head_dim!r}")
        require(self.rms_norm_eps > 0, f"rms_norm_eps must be > 0, got {self.rms_norm_eps!r}")
        require(
            self.model_type in SUPPORTED_MODEL_TYPES,
            f"model_type {self.model_type!r} is not supported; choose from {SUPPORTED_MODEL_TYPES}",
        )
        require(
            self.sliding_window is None or self.sliding_window > 0,
            f"sliding_window must be None or > 0, got {self.sliding_window!r}",
        )
        for token_id in self.eos_token_ids:
            require(
                0 <= token_id < self.vocab_size, f"eos token id {token_id!r} is out of the vocab"
            )

    # ---- derived sizes -------------------------------------------------------------

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def max_context_len(self) -> int:
        """Longest sequence whose attention is plain causal attention (window not reached)."""
        if self.sliding_window is None:
            return self.max_position_embeddings
        return min(self.max_position_embeddings, self.sliding_window)

    def layer_num_params(self) -> int:
        """Parameters in one decoder layer."""
        h, i = self.hidden_size, self.intermediate_size
        attn = h * (self.q_size + 2 * self.kv_size) + self.q_size * h
        if self.attention_bias:
            attn += self.q_size + 2 * self.kv_size + h
        mlp = 3 * h * i + (2 * i + h if self.mlp_bias else 0)
        return attn + mlp + 2 * h  # + two RMSNorm weights

    def num_params(self, layer_start: int = 0, layer_end: int | None = None) -> int:
        """Parameters a stage holding layers [layer_start, layer_end) keeps in memory.

        The first stage holds the embedding, the last the final norm and lm_head (a
        tied lm_head is the embedding when the stage holds both ends, else a copy).
        """
        layer_end = self.num_layers if layer_end is None else layer_end
        n = (layer_end - layer_start) * self.layer_num_params()
        has_first, has_last = layer_start == 0, layer_end == self.num_layers
        embedding = self.vocab_size * self.hidden_size
        if has_first:
            n += embedding
        if has_last:
            n += self.hidden_size
            if not (self.tie_word_embeddings and has_first):
                n += embedding
        return n

    def kv_nbytes_per_token_per_layer(self, dtype: str) -> int:
        return 2 * self.kv_size * DTYPE_NBYTES[dtype]

    # ---- Hugging Face config.json ---------------------------------------------------

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Reads an HF config.json dict (transformers 4.x or 5.x layout)."""
        model_type = d.get("model_type", "llama")
        require(
            model_type in SUPPORTED_MODEL_TYPES,
            f"model_type {model_type!r} is not supported; choose from {SUPPORTED_MODEL_TYPES}",
        )
        act = d.get("hidden_act", "silu")
        require(act == "silu", f"hidden_act {act!r} is not supported (Llama uses 'silu')")
        require(
            int(d.get("pretraining_tp", 1)) == 1, f"pretraining_tp {d.get('pretraining_tp')!r} != 1"
        )
        num_heads = int(d["num_attention_heads"])
        head_dim = d.get("head_dim") or int(d["hidden_size"]) // num_heads
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return cls(
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_layers=int(d["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(d.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope=_rope_from_hf(d),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", False)),
            mlp_bias=bool(d.get("mlp_bias", False)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
            sliding_window=d.get("sliding_window"),
            model_type=model_type,
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """An HF LlamaConfig dict with the same math (used to build baselines and checkpoints)."""
        rope: dict[str, Any] = {"rope_type": self.rope.rope_type, "rope_theta": self.rope.theta}
        if self.rope.rope_type != "default":
            rope["factor"] = self.rope.factor
        if self.rope.rope_type == "llama3":
            rope["low_freq_factor"] = self.rope.low_freq_factor
            rope["high_freq_factor"] = self.rope.high_freq_factor
            rope["original_max_position_embeddings"] = self.rope.original_max_position_embeddings
        return {
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": rope,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids)
            if len(self.eos_token_ids) != 1
            else self.eos_token_ids[0],
        }

    @classmethod
    def from_checkpoint_dir(cls, path: str | Path) -> ModelConfig:
        """config.json of an HF checkpoint; generation_config.json's eos ids win if present."""
        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ConfigError(f"model {str(path)!r}: no config.json in that directory")
        d = json.loads(config_file.read_text())
        generation_file = path / "generation_config.json"
        if generation_file.is_file():
            generation = json.loads(generation_file.read_text())
            if generation.get("eos_token_id") is not None:
                d = {**d, "eos_token_id": generation["eos_token_id"]}
        return cls.from_hf_dict(d)


def _rope_from_hf(d: dict[str, Any]) -> RopeConfig:
    # transformers 5.x: rope_parameters = {rope_type, rope_theta, ...};
    # 4.x: rope_theta at top level and optional rope_scaling = {rope_type|type, factor, ...}.
    params = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    kwargs: dict[str, Any] = {"theta": float(theta), "rope_type": rope_type}
    if rope_type != "default":
        kwargs["factor"] = float(params.get("factor", 1.0))
    if rope_type == "llama3":
        kwargs["low_freq_factor"] = float(params["low_freq_factor"])
        kwargs["high_freq_factor"] = float(params["high_freq_factor"])
        kwargs["original_max_position_embeddings"] = int(params["original_max_position_embeddings"])
    return RopeConfig(**kwargs)


@dataclass(frozen=True)
class KernelBuildConfig:
    """Where and with what the native kernels are built: one library per process, so
    these are process-wide (load_config(KernelBuildConfig, "KERNEL") reads them)."""

    # Directory of the built libraries ($LLMESH_KERNEL_CACHE); "" = ~/.cache/llmesh/kernels.
    cache: str = ""
    # The C compiler ($CC); "" = cc, else gcc, on PATH.
    compiler: str = dataclasses.field(default="", metadata={ENV: "CC"})


def _is_device_name(device: str) -> bool:
    """'cpu', 'cuda' or 'cuda:N' (what the engine places weights and the KV pool on)."""
    if device in ("cpu", "cuda"):
        return True
    prefix, _, index = device.partition(":")
    return prefix == "cuda" and index.isdigit()


@dataclass(frozen=True)
class EngineConfig:
    """Knobs of one worker engine."""

    model: str = "tiny"  # "tiny" (embedded, seeded) or a local HF checkpoint directory
    dtype: str = "float32"  # weights, activations and KV: one of DTYPE_NBYTES
    device: str = "cpu"  # torch device of weights and KV pool
    block_size: int = 16  # tokens per KV block
    memory_capacity_bytes: int = 256 * MiB  # weights + KV pool must fit; the pool gets the rest
    num_kv_blocks: int | None = None  # exact pool size instead of "all that fits" (tests, sims)
    max_num_seqs: int = 64  # most requests in the running batch
    max_num_batched_tokens: int = 512  # token budget per step (prefill chunks + decodes)
    max_model_len: int | None = None  # context limit; None = the model's
    scheduling_policy: str = "fcfs"  # "fcfs", or "priority" (higher priority first, then FCFS)
    # One of KERNELS; a config loaded by load_config also reads $LLMESH_KERNELS.
    # Engines that hand requests to each other (migration, pipelines) must run the same
    # kernels for bit-identical continuations: the two backends round differently.
    kernels: str = dataclasses.field(default="auto", metadata={ENV: "LLMESH_KERNELS"})

    def __post_init__(self) -> None:
        require(
            isinstance(self.model, str) and self.model != "",
            f"model must be 'tiny' or a path, got {self.model!r}",
        )
        require(
            self.dtype in DTYPE_NBYTES, f"dtype {self.dtype!r} is not one of {tuple(DTYPE_NBYTES)}"
        )
        require(
            isinstance(self.device, str) and _is_device_name(self.device),
            f"device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}",
        )
        require(
            isinstance(self.block_size, int) and self.block_size > 0,
            f"block_size must be an int > 0, got {self.block_size!r}",
        )
        require(
            isinstance(self.memory_capacity_bytes, int) and self.memory_capacity_bytes > 0,
            f"memory_capacity_bytes must be an int > 0, got {self.memory_capacity_bytes!r}",
        )
        require(
            self.num_kv_blocks is None
            or (isinstance(self.num_kv_blocks, int) and self.num_kv_blocks > 0),
            f"num_kv_blocks must be None or an int > 0, got {self.num_kv_blocks!r}",
        )
        require(
            isinstance(self.max_num_seqs, int) and self.max_num_seqs > 0,
            f"max_num_seqs must be an int > 0, got {self.max_num_seqs!r}",
        )
        require(
            isinstance(self.max_num_batched_tokens, int) and self.max_num_batched_tokens > 0,
            f"max_num_batched_tokens must be an int > 0, got {self.max_num_batched_tokens!r}",
        )
        require(
            self.max_model_len is None
            or (isinstance(self.max_model_len, int) and self.max_model_len > 0),
            f"max_model_len must be None or an int > 0, got {self.max_model_len!r}",
        )
        require(
            self.scheduling_policy in SCHEDULING_POLICIES,
            f"scheduling_policy {self.scheduling_policy!r} is not one of {SCHEDULING_POLICIES}",
        )
        require(
            self.kernels in KERNELS,
            f"kernels {self.kernels!r} is not one of {KERNELS}",
        )
        require(
            not (self.kernels == "native" and self.device != "cpu"),
            f"kernels 'native' run on the CPU only, not device {self.device!r}: "
            "use kernels 'torch' (or 'auto') on a GPU",
        )

    def replace(self, **changes: Any) -> EngineConfig:
        return dataclasses.replace(self, **changes)
