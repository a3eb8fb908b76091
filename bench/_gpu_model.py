"""The device check's in-process parts: a random-weight Llama checkpoint, the engine's
greedy tokens vs transformers' on the same device, decode throughput, and the device's
memory bandwidth (bench/gpu_check.py).

Shapes: "1b" is TinyLlama-1.1B's (22 layers, hidden 2048, GQA 32/4 heads of 64, MLP
5632, vocab 32000: 1.1B parameters, 4.4 GB in float32); "small" is a few MB, for a CPU.
Weights come from transformers' own initialisation (normal, std 0.02) under a fixed
seed, saved as a checkpoint the engine loads through its real path.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from bench._checkpoint import _write_byte_tokenizer
from services.worker.engine import EngineConfig, LLMEngine, SamplingParams

SHAPES = {
    "1b": dict(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
        num_attention_heads=32, num_key_value_heads=4, head_dim=64,
        max_position_embeddings=2048,
    ),
    "small": dict(
        vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        max_position_embeddings=1024,
    ),
}  # fmt: skip
BOS, EOS = 256, 257  # the byte tokenizer's


def random_checkpoint(shape: str, device: str, seed: int = 0):
    """(checkpoint directory, the same model in transformers on `device`, float32)."""
    import transformers

    config = transformers.LlamaConfig(
        **SHAPES[shape], rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
        bos_token_id=BOS, eos_token_id=EOS, hidden_act="silu",
    )  # fmt: skip
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config).float().eval()
    path = Path(tempfile.mkdtemp(prefix=f"llmesh-gpu-check-{shape}-", dir=_scratch_dir(model)))
    model.save_pretrained(path, safe_serialization=True)
    _write_byte_tokenizer(path / "tokenizer.json")
    return path, model


def _scratch_dir(model) -> str | None:
    """/dev/shm when it holds the checkpoint twice over (a container's is often 64 MB),
    else the default temporary directory (disk)."""
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > 2 * nbytes:
        return str(shm)
    return None


def tiny_in_transformers(engine: LLMEngine, device: str):
    """The embedded tiny model (the engine's weights) in transformers, on `device`."""
    import transformers

    from services.worker.engine.tiny import TINY_MODEL_CONFIG
    from services.worker.engine.weights import to_hf_tensors

    model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**TINY_MODEL_CONFIG.to_hf_dict())
    ).eval()
    hf = {k: t.to("cpu") for k, t in to_hf_tensors(TINY_MODEL_CONFIG, engine.model.weights).items()}
    model.load_state_dict(hf, strict=False)
    return model.to(device)


def hf_greedy(model, prompt: list[int], max_tokens: int) -> list[int]:
    """transformers' greedy generate(), one prompt alone, no EOS stop."""
    device = next(model.parameters()).device
    model.generation_config.eos_token_id = None
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt], device=device),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=device),
            max_new_tokens=max_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


def engine_greedy(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """The engine's greedy tokens for every prompt, all in one continuous batch."""
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    tokens: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        engine.add_request(f"hf{i}", prompt, params)
        tokens[f"hf{i}"] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
    return [tokens[f"hf{i}"] for i in range(len(prompts))]


def compare_with_hf(engine: LLMEngine, hf_model, prompts, max_tokens: int) -> dict:
    """Exact greedy tokens, engine (batched) vs transformers (alone), per prompt; where
    they differ, the first differing position. And the engine's own batched tokens vs
    each prompt alone in it (batch invariance, in tokens)."""
    ours = engine_greedy(engine, prompts, max_tokens)
    alone = [engine_greedy(engine, [p], max_tokens)[0] for p in prompts]
    theirs = [hf_greedy(hf_model, p, max_tokens) for p in prompts]
    first_diff = [
        next((i for i, (a, b) in enumerate(zip(x, y, strict=True)) if a != b), None)
        for x, y in zip(ours, theirs, strict=True)
    ]
    return {
        "exact": ours == theirs,
        "sequences": len(prompts),
        "tokens": sum(len(t) for t in ours),
        "first_diff": [d for d in first_diff if d is not None],
        "batched_equals_alone": ours == alone,
    }


def layer_loop_syncs(engine: LLMEngine, prompt: list[int], max_tokens: int) -> int | None:
    """Host synchronisations CUDA's sync debug mode reports inside the decoder layers
    over a short generation (None off CUDA). Should be 0: docs/gpu.md."""
    if not torch.cuda.is_available() or engine.model.device.type != "cuda":
        return None
    forward, count = engine.model.forward_layers, 0

    def watched(*args, **kwargs):
        nonlocal count
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                return forward(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
                count += len(caught)

    engine.model.forward_layers = watched
    try:
        engine_greedy(engine, [prompt], max_tokens)
    finally:
        engine.model.forward_layers = forward
    return count


def make_engine(model: str, device: str, max_seqs: int, max_len: int) -> LLMEngine:
    """An engine on `device` with the torch kernels (the GPU's) and a pool for
    max_seqs requests of max_len tokens."""
    config = EngineConfig(
        model=model, device=device, kernels="torch", dtype="float32", block_size=16,
        max_num_seqs=max_seqs, max_num_batched_tokens=8192,
        num_kv_blocks=max_seqs * math.ceil(max_len / 16) + 8,
        memory_capacity_bytes=1 << 40,  # accounting only: the pool is sized in blocks
    )  # fmt: skip
    return LLMEngine.from_config(config)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


@dataclass
class Throughput:
    batch: int
    tokens_per_s: float
    step_ms: float
    mean_context: float  # tokens each request attends over, mean over the timed steps


def decode_throughput(
    engine: LLMEngine, device: str, batch: int, prompt_len: int, steps: int, seed: int
) -> Throughput:
    """`batch` requests of prompt_len random tokens prefilled, then `steps` decode steps
    of the whole batch timed (each step: one token per request)."""
    gen = torch.Generator().manual_seed(seed)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_tokens=steps + 4, ignore_eos=True)
    ids = [f"tp{batch}-{i}" for i in range(batch)]
    for rid in ids:
        engine.add_request(
            rid, torch.randint(0, vocab, (prompt_len,), generator=gen).tolist(), params
        )
    started: set[str] = set()
    while len(started) < batch:  # prefills (chunked) until every request has a token
        started.update(out.request_id for out in engine.step())
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync(device)
    elapsed = time.perf_counter() - start
    for rid in ids:
        engine.abort_request(rid)
    while engine.has_unfinished_requests():
        engine.step()
    return Throughput(
        batch, batch * steps / elapsed, 1000 * elapsed / steps, prompt_len + 1 + steps / 2
    )


def device_busy_ms(engine: LLMEngine, batch: int, prompt_len: int, steps: int = 4) -> float | None:
    """GPU kernel time per decode step at `batch` (torch.profiler's self device times,
    summed), to set beside the step's wall time: far less means the host's launches,
    not the GPU, set the pace (docs/gpu.md). None off CUDA or where the profiler's
    fields differ."""
    if engine.model.device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    params = SamplingParams(max_tokens=steps + 4, ignore_eos=True)
    ids = [f"prof{i}" for i in range(batch)]
    for rid in ids:
        engine.add_request(rid, [1] * prompt_len, params)
    started: set[str] = set()
    while len(started) < batch:
        started.update(out.request_id for out in engine.step())
    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                engine.step()
            torch.cuda.synchronize()
        events = prof.key_averages()
        total_us = sum(
            getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
            for e in events
        )
        return total_us / 1000 / steps
    except Exception:  # the profiler's API moves between torch versions: a figure, not a check
        return None
    finally:
        for rid in ids:
            engine.abort_request(rid)
        while engine.has_unfinished_requests():
            engine.step()


def decode_bytes_per_step(engine: LLMEngine, batch: int, mean_context: float) -> tuple[int, int]:
    """(weight bytes a decode step reads, KV bytes it reads): every layer matrix, the
    norms and the lm_head (the embedding: `batch` rows), and every request's K and V."""
    c, itemsize = engine.model_config, engine.model.dtype.itemsize
    embedding = c.vocab_size * c.hidden_size * itemsize
    weights = engine.weight_nbytes - (0 if c.tie_word_embeddings else embedding)
    weights += batch * c.hidden_size * itemsize
    kv_per_token = c.num_layers * 2 * c.kv_size * itemsize
    return weights, int(batch * mean_context * kv_per_token)


def copy_bandwidth_gbps(device: str, nbytes: int, repeats: int = 10) -> float:
    """Device memory bandwidth from a big copy: (read + write bytes) / time, GB/s."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    sync(device)
    return 2 * nbytes * repeats / (time.perf_counter() - start) / 1e9


def environment(device: str) -> dict:
    import transformers

    info = {
        "device": device,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "cpu_count": os.cpu_count(),
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
