"""Helpers shared by the engine tests."""

from __future__ import annotations

import random

import torch

from services.worker.engine import LLMEngine


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
