"""A cost-model executor for the simulator: same interface as TorchExecutor, no tensors.

Step time is linear in five features of the scheduled batch:

    t = fixed_s
      + per_token_s          * N   (batched tokens: weight matmuls)
      + per_seq_s            * S   (scheduled requests: per-request bookkeeping, sampling)
      + per_context_token_s  * C   (sum of context lengths: reading the KV cache)
      + per_attention_pair_s * P   (query-key pairs: attention FLOPs, quadratic in prefill)

scaled by the fraction of layers the stage holds. Profiles are either fitted to
measurements of the real TorchExecutor (`llmesh calibrate`, fit_profile below) or
derived from published hardware figures (LLAMA_7B_A10 below).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.common.config import require
from services.worker.engine.config import DTYPE_NBYTES, ModelConfig, RopeConfig
from services.worker.engine.executor import ExecutorOutput
from services.worker.engine.sampling_params import splitmix64
from services.worker.engine.scheduler import SchedulerOutput
from services.worker.engine.tiny import TINY_MODEL_CONFIG

FEATURE_NAMES = (
    "fixed_s",
    "per_token_s",
    "per_seq_s",
    "per_context_token_s",
    "per_attention_pair_s",
)


@dataclass(frozen=True)
class CostModelProfile:
    """Coefficients of the step-time model for one model on one machine."""

    name: str
    model: ModelConfig  # shape: weight bytes and KV bytes per block follow from it
    dtype: str  # dtype of weights and KV on the profiled machine
    fixed_s: float
    per_token_s: float
    per_seq_s: float
    per_context_token_s: float
    per_attention_pair_s: float
    memory_capacity_bytes: int | None = None  # the profiled machine's usable memory, if known
    source: str = ""  # how the numbers were obtained

    def __post_init__(self) -> None:
        for name in FEATURE_NAMES:
            value = getattr(self, name)
            require(value >= 0, f"cost model {self.name!r}: {name} must be >= 0, got {value!r}")
        require(
            self.dtype in DTYPE_NBYTES,
            f"cost model {self.name!r}: dtype {self.dtype!r} is not one of {tuple(DTYPE_NBYTES)}",
        )

    def coefficients(self) -> tuple[float, ...]:
        return tuple(getattr(self, name) for name in FEATURE_NAMES)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model"]["eos_token_ids"] = list(self.model.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CostModelProfile:
        model = dict(d["model"])
        model["rope"] = RopeConfig(**model["rope"])
        model["eos_token_ids"] = tuple(model["eos_token_ids"])
        return cls(**{**d, "model": ModelConfig(**model)})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> CostModelProfile:
        return cls.from_dict(json.loads(Path(path).read_text()))


def batch_features(batch: SchedulerOutput) -> tuple[float, ...]:
    """(1, N, S, C, P) of a scheduled batch, in FEATURE_NAMES order."""
    num_tokens = num_context = num_pairs = 0
    for r in batch.requests:
        t, computed = len(r.token_ids), r.num_computed_tokens
        num_tokens += t
        num_context += computed + t
        num_pairs += t * computed + t * (t + 1) // 2
    return (
        1.0,
        float(num_tokens),
        float(len(batch.requests)),
        float(num_context),
        float(num_pairs),
    )


class CostModel:
    def __init__(self, profile: CostModelProfile, layer_fraction: float = 1.0) -> None:
        self.profile = profile
        self.layer_fraction = layer_fraction  # share of the model's layers the stage runs
        self._coefficients = profile.coefficients()  # the profile is frozen

    def step_time(self, batch: SchedulerOutput) -> float:
        if batch.is_empty:
            return 0.0
        features = batch_features(batch)
        return self.layer_fraction * sum(
            c * f for c, f in zip(self._coefficients, features, strict=True)
        )


class CostModelExecutor:
    """Returns fake tokens (deterministic in request seed and position, never EOS) and the
    modelled step time (LLMEngine.simulated's executor)."""

    def __init__(
        self, profile: CostModelProfile, vocab_size: int, eos_token_ids: tuple[int, ...]
    ) -> None:
        self.cost_model = CostModel(profile)
        self.vocab_size = vocab_size
        self.eos_token_ids = frozenset(eos_token_ids)

    def step_time(self, batch: SchedulerOutput) -> float:
        return self.cost_model.step_time(batch)

    def execute(self, batch: SchedulerOutput, hidden_states: Any = None) -> ExecutorOutput:
        del hidden_states
        elapsed = self.step_time(batch)
        tokens = [
            self.fake_token(r.request_id, r.params.seed, r.num_context_tokens)
            for r in batch.requests
            if r.is_sampling
        ]
        return ExecutorOutput(tokens, None, elapsed)

    def fake_token(self, request_id: str, seed: int | None, position: int) -> int:
        key = seed if seed is not None else zlib.crc32(request_id.encode())
        token = splitmix64(_mixed_key(key) ^ position) % self.vocab_size
        while token in self.eos_token_ids:
            token = (token + 1) % self.vocab_size
        return token


@functools.lru_cache(maxsize=65536)
def _mixed_key(key: int) -> int:
    # splitmix64(key) once per request seed, not once per token (the simulator's hot path).
    return splitmix64(key)


# ---- fitting ---------------------------------------------------------------------------


def fit_coefficients(samples: list[tuple[tuple[float, ...], float]]) -> tuple[float, ...]:
    """Non-negative least squares on relative error: minimises sum ((model - t) / t)^2.

    Relative error keeps millisecond decode steps as well fitted as long prefills.
    Active set: drop the most negative coefficient and refit until none is negative.
    """
    import torch

    features = torch.tensor([f for f, _ in samples], dtype=torch.float64)
    seconds = torch.tensor([t for _, t in samples], dtype=torch.float64)
    weighted = features / seconds[:, None]
    target = torch.ones_like(seconds)
    active = list(range(features.shape[1]))
    while True:
        solution = torch.linalg.lstsq(weighted[:, active], target[:, None]).solution[:, 0]
        if (solution >= 0).all() or len(active) == 1:
            break
        del active[int(torch.argmin(solution))]
    coefficients = [0.0] * features.shape[1]
    for index, value in zip(active, solution.clamp(min=0).tolist(), strict=True):
        coefficients[index] = value
    return tuple(coefficients)


def fit_profile(
    name: str,
    model: ModelConfig,
    dtype: str,
    samples: list[tuple[tuple[float, ...], float]],
    source: str,
    memory_capacity_bytes: int | None = None,
) -> CostModelProfile:
    coefficients = dict(zip(FEATURE_NAMES, fit_coefficients(samples), strict=True))
    return CostModelProfile(
        name=name,
        model=model,
        dtype=dtype,
        memory_capacity_bytes=memory_capacity_bytes,
        source=source,
        **coefficients,
    )


# ---- built-in profiles -----------------------------------------------------------------

# Llama-2-7B's shape (config.json of meta-llama/Llama-2-7b-hf).
LLAMA_7B_CONFIG = ModelConfig(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_layers=32,
    num_heads=32,
    num_kv_heads=32,
    head_dim=128,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_ids=(2,),
)


def _llama_7b_a10() -> CostModelProfile:
    """7B Llama, fp16, on a 24 GB A10-class GPU, from published hardware figures.

    - A10: ~600 GB/s memory bandwidth, ~125 TFLOP/s fp16 tensor peak, 24 GB of which ~90%
      is usable -> memory_capacity_bytes = 21.6e9.
    - Weights: 6.74e9 params * 2 B = 13.5 GB. Decode is memory-bound: every step reads all
      weights once -> fixed_s = 13.5e9 / 600e9 = 22.5 ms.
    - KV per token: 2 (K, V) * 32 layers * 4096 * 2 B = 0.5 MiB; each step reads every
      request's context -> per_context_token_s = 524288 / 600e9 = 0.87 us.
    - Matmul FLOPs: 2 * 6.74e9 per token at 60% of peak (75 TFLOP/s) ->
      per_token_s = 0.18 ms (so a 512-token prefill costs ~115 ms).
    - Attention FLOPs: 4 * 32 layers * 4096 per (query, key) pair at 75 TFLOP/s ->
      per_attention_pair_s = 7.0e-12 s (the quadratic prefill term).
    - per_seq_s: 20 us of host-side work per request per step (an assumption, the order
      vLLM's scheduler + sampler spend on CPU).
    KV pool: 21.6e9 - 13.5e9 = 8.1 GB = ~15.5k tokens = ~966 blocks of 16.
    """
    bandwidth, peak_flops, mfu = 600e9, 125e12, 0.6
    params = LLAMA_7B_CONFIG.num_params()
    weight_bytes = params * DTYPE_NBYTES["float16"]
    kv_bytes_per_token = LLAMA_7B_CONFIG.num_layers * LLAMA_7B_CONFIG.kv_nbytes_per_token_per_layer(
        "float16"
    )
    c = LLAMA_7B_CONFIG
    return CostModelProfile(
        name="llama-7b-a10",
        model=LLAMA_7B_CONFIG,
        dtype="float16",
        fixed_s=weight_bytes / bandwidth,
        per_token_s=2 * params / (peak_flops * mfu),
        per_seq_s=20e-6,
        per_context_token_s=kv_bytes_per_token / bandwidth,
        per_attention_pair_s=4 * c.num_layers * c.num_heads * c.head_dim / (peak_flops * mfu),
        memory_capacity_bytes=int(0.9 * 24e9),
        source="derived from A10 hardware figures; see cost_model._llama_7b_a10",
    )


# Fitted by `llmesh calibrate --model tiny --threads 2 --repeats 10` on the 2-core x86
# development VM (AMD EPYC, torch 2.13 CPU, fp32, native kernels with the decoder layers
# in one call): 3.9% mean error over the 14 probes, the best of four fits the same
# hour (the others: fixed 0.46-0.49 ms, per token 3.9-4.7e-5 s, 7-8% error; the VM is
# shared). 2026-12-04. Re-run calibrate for another machine and load its JSON.
TINY_CPU = CostModelProfile(
    name="tiny-cpu",
    model=TINY_MODEL_CONFIG,
    dtype="float32",
    fixed_s=7.29e-4,
    per_token_s=4.13e-5,
    per_seq_s=0.0,
    per_context_token_s=6.29e-8,
    per_attention_pair_s=7.05e-8,
    memory_capacity_bytes=256 * 1024 * 1024,
    source="llmesh calibrate on a shared 2-core x86 VM (AMD EPYC), native kernels, 2 threads, "
    "14 probes x 10 rounds",
)

LLAMA_7B_A10 = _llama_7b_a10()

BUILTIN_PROFILES: dict[str, CostModelProfile] = {p.name: p for p in (TINY_CPU, LLAMA_7B_A10)}


def get_profile(name_or_path: str | CostModelProfile) -> CostModelProfile:
    """A built-in profile by name, or one saved by `llmesh calibrate` (a JSON path)."""
    if isinstance(name_or_path, CostModelProfile):
        return name_or_path
    if name_or_path in BUILTIN_PROFILES:
        return BUILTIN_PROFILES[name_or_path]
    path = Path(name_or_path)
    if path.is_file():
        return CostModelProfile.load(path)
    raise ValueError(
        f"cost model profile {name_or_path!r} is neither built in ({sorted(BUILTIN_PROFILES)}) nor a file"
    )
