"""Helpers shared by the engine tests."""

from __future__ import annotations

import hashlib
import pickle
import random

import pytest
import torch

from services.worker.engine import LLMEngine, native
from services.worker.engine.tiny import TINY_MODEL_CONFIG

NO_NATIVE_KERNELS = "the native kernels are unavailable here"


def skip_without_native_kernels() -> None:
    """Skips the calling test where the native kernels cannot run the tiny model (no C
    compiler, most often: the README makes one optional), saying why."""
    why_not = native.unavailable(TINY_MODEL_CONFIG, "float32", "cpu")
    if why_not is not None:
        pytest.skip(f"{NO_NATIVE_KERNELS}: {why_not}")


def random_prompts(
    seed: int, num_prompts: int, min_len: int, max_len: int, vocab_size: int = 256
) -> list[list[int]]:
    rng = random.Random(seed)
    return [
        [rng.randrange(vocab_size) for _ in range(rng.randint(min_len, max_len))]
        for _ in range(num_prompts)
    ]


def collect(outputs, tokens: dict[str, list[int]]) -> dict[str, list[int]]:
    """Appends step outputs to tokens (request id -> output ids), checking token indices.
    Tokens of a request first seen mid-way are padded with -1 (not observed)."""
    for out in outputs:
        got = tokens.setdefault(out.request_id, [-1] * out.first_token_index)
        assert out.first_token_index == len(got), (out, got)
        got += out.new_token_ids
    return tokens


def run_to_completion(
    engine: LLMEngine, tokens: dict[str, list[int]] | None = None
) -> dict[str, list[int]]:
    """Steps until idle; returns every request's output tokens (added to `tokens`)."""
    tokens = {} if tokens is None else tokens
    while engine.has_unfinished_requests():
        collect(engine.step(), tokens)
    return tokens


def dense_greedy(engine: LLMEngine, prompt: list[int], max_tokens: int) -> list[int]:
    """Greedy tokens from the no-cache reference forward of the engine's own model."""
    assert engine.model is not None
    sequence = list(prompt)
    with torch.inference_mode():
        for _ in range(max_tokens):
            sequence.append(int(engine.model.forward_dense(sequence)[-1].argmax()))
    return sequence[len(prompt) :]


def migrate(source, destination, request_id: str, tokens: dict[str, list[int]]) -> None:
    """Llumnix's protocol: pre-allocate, copy blocks while decoding, stop-and-copy, commit."""
    state = source.migration.export_request_state(request_id)
    reserved = destination.migration.reserve_blocks(
        destination.block_manager.num_blocks_for(state.num_tokens + 8)
    )
    # Stage 1: copy the full blocks computed so far while the request keeps decoding.
    source_blocks = source.migration.request_block_ids(request_id)
    num_copied = (
        source.migration.export_request_state(request_id).num_computed_tokens
        // source.config.block_size
    )
    destination.migration.write_kv_blocks(
        reserved[:num_copied], source.migration.read_kv_blocks(source_blocks[:num_copied])
    )
    for _ in range(3):
        collect(source.step(), tokens)
    # Last stage: stop the request between steps and copy what is left with its state.
    source.migration.suspend_request(request_id)
    state = source.migration.export_request_state(request_id)
    assert state.num_computed_tokens == state.num_tokens - 1  # last sampled token not fed yet
    source_blocks = source.migration.request_block_ids(request_id)
    num_needed = destination.block_manager.num_blocks_for(state.num_computed_tokens)
    destination.migration.write_kv_blocks(
        reserved[num_copied:num_needed],
        source.migration.read_kv_blocks(source_blocks[num_copied:num_needed]),
    )
    wire = pickle.loads(pickle.dumps(state))  # plain data: it travels as it is
    assert wire == state
    destination.migration.import_request(wire, reserved[:num_needed])
    destination.migration.release_blocks(reserved[num_needed:])
    assert source.migration.remove_request(request_id) == state
    assert source.request_status(request_id) is None


def weight_digest(engine: LLMEngine) -> str:
    """A hash of every weight under its HF name, bit for bit."""
    digest = hashlib.sha256()
    for name, tensor in sorted(engine.layer_ranges.export_weights().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
