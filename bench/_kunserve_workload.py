"""The requests of `llmesh bench kunserve_mechanism`, and the tokens they must produce.

Named sets: "batch" (served unpipelined, then by the group), "running<g>" (decoding on
the members when they drop), "restoring<g>" (running in the group at the restore).
Every request's tokens come from one in-process engine on the same weights: greedy and
seeded sampling give the same tokens however the mesh batches, pipelines or moves it.
"""

from __future__ import annotations

from pathlib import Path

Request = tuple[list[int], dict]  # (prompt token ids, sampling kwargs of generate_stream)

NUM_RUNNING_PER_MEMBER = 2  # requests decoding on each member at the drop and the restore


def workload(num: int, prompt_len: int, max_tokens: int, offset: int) -> list[Request]:
    """Deterministic requests, greedy and seeded (temperature 0.8) alternately; no EOS
    stop, so every request produces exactly max_tokens tokens."""
    return [
        (
            [(31 * i + 7 * j + offset) % 256 for j in range(prompt_len + i % 4)],
            {
                "max_tokens": max_tokens,
                "ignore_eos": True,
                "seed": 1000 + offset + i,
                "temperature": 0.0 if i % 2 else 0.8,
            },
        )
        for i in range(num)
    ]


def make_workloads(
    stages: list[int], batch_size: int, prompt_len: int, max_tokens: int
) -> dict[str, list[Request]]:
    """The named request sets; the running ones have 4x longer prompts (more KV to move)."""
    workloads = {"batch": workload(batch_size, prompt_len, max_tokens, 0)}
    for g in stages:
        num = NUM_RUNNING_PER_MEMBER * g
        workloads[f"running{g}"] = workload(num, 4 * prompt_len, max_tokens, 100 + g)
        workloads[f"restoring{g}"] = workload(num, prompt_len, max_tokens, 200 + g)
    return workloads


def reference_tokens(
    model_dir: Path, workloads: dict[str, list[Request]]
) -> dict[str, list[list[int]]]:
    """Every request's tokens from one in-process engine, all run together."""
    from services.common.config import load_config
    from services.worker.engine import EngineConfig, LLMEngine, SamplingParams

    engine = LLMEngine.from_config(
        load_config(EngineConfig, "ENGINE", {"model": str(model_dir), "max_num_seqs": 256})
    )
    tokens: dict[str, list[int]] = {}
    for name, requests in workloads.items():
        for i, (prompt, sampling) in enumerate(requests):
            tokens[f"{name}/{i}"] = []
            engine.add_request(f"{name}/{i}", list(prompt), SamplingParams(**sampling))
    while engine.has_unfinished_requests():
        for output in engine.step():
            tokens[output.request_id].extend(output.new_token_ids)
    return {
        name: [tokens[f"{name}/{i}"] for i in range(len(requests))]
        for name, requests in workloads.items()
    }
