"""The cost-model executor, its profiles, and accounting-only engines for the simulator."""

from __future__ import annotations

import pytest

from services.worker.engine import CostModelProfile, SamplingParams, get_profile
from services.worker.engine.cost_model import (
    LLAMA_7B_A10,
    TINY_CPU,
    CostModel,
    batch_features,
    fit_coefficients,
)
from services.worker.engine.scheduler import ScheduledRequest, SchedulerOutput


def batch(*chunks: tuple[int, int]) -> SchedulerOutput:
    """chunks: (num_computed_tokens, num_new_tokens) per request."""
    requests = [
        ScheduledRequest(f"r{i}", [1] * new, computed, [], SamplingParams(), is_sampling=True)
        for i, (computed, new) in enumerate(chunks)
    ]
    return SchedulerOutput(requests, [], sum(new for _, new in chunks))


def test_batch_features():
    # decode at context 100 (1 new), prefill of 4 from 0, chunk of 3 after 5
    assert batch_features(batch((99, 1), (0, 4), (5, 3))) == (
        1.0,
        8.0,
        3.0,
        100 + 4 + 8,
        99 + 1 + 10 + 15 + 6,
    )


def test_7b_a10_profile_follows_the_published_figures():
    p = LLAMA_7B_A10
    assert p.fixed_s == pytest.approx(13_476_831_232 / 600e9)  # 22.5 ms: read all weights
    assert p.per_context_token_s == pytest.approx(524_288 / 600e9)
    assert p.per_token_s == pytest.approx(2 * 6_738_415_616 / 75e12)  # 0.18 ms
    model = CostModel(p)
    decode_32 = model.step_time(batch(*[(511, 1)] * 32))  # 32 requests at context 512
    assert decode_32 == pytest.approx(
        p.fixed_s
        + 32
        * (p.per_token_s + p.per_seq_s + 512 * p.per_context_token_s + 512 * p.per_attention_pair_s)
    )
    # ms: 22.5 read weights + 5.8 matmuls + 0.6 host + 14.3 read 16k tokens of KV + 0.1 attention
    assert round(decode_32 * 1e3, 1) == 43.3
    prefill = model.step_time(batch((0, 512)))
    assert prefill == pytest.approx(
        p.fixed_s
        + 512 * p.per_token_s
        + p.per_seq_s
        + 512 * p.per_context_token_s
        + 512 * 513 / 2 * p.per_attention_pair_s
    )


def test_fit_recovers_known_coefficients():
    truth = (1e-3, 2e-5, 3e-5, 4e-8, 5e-10)
    batches = (
        [batch(*[(c, 1)] * b) for b in (1, 4, 16) for c in (10, 300)]
        + [batch((0, n)) for n in (16, 64, 256)]
        + [batch((100, 50), (7, 1))]
    )
    samples = [
        (batch_features(b), sum(c * f for c, f in zip(truth, batch_features(b), strict=True)))
        for b in batches
    ]
    assert fit_coefficients(samples) == pytest.approx(truth, rel=1e-6)


def test_fit_never_returns_negative_coefficients():
    samples = [((1.0, float(n), 1.0, float(n), float(n * n)), 1e-3) for n in (1, 2, 4, 8)]
    assert all(c >= 0 for c in fit_coefficients(samples))


def test_profile_json_round_trip(tmp_path):
    path = tmp_path / "p.json"
    LLAMA_7B_A10.save(path)
    assert CostModelProfile.load(path) == LLAMA_7B_A10
    assert get_profile(str(path)) == LLAMA_7B_A10
    assert get_profile("tiny-cpu") is TINY_CPU
    with pytest.raises(ValueError, match="neither built in"):
        get_profile("gpt-9")


def test_accounting_only_engine_runs_the_real_scheduler(make_simulated_engine):
    engine = make_simulated_engine(
        "tiny-cpu",
        num_kv_blocks=50_000,
        memory_capacity_bytes=2**40,
        max_num_seqs=256,
    )
    assert engine.kv_cache is None and engine.model is None
    assert engine.block_manager.num_total_blocks == 50_000
    for i in range(200):
        engine.add_request(f"r{i}", [1] * (10 + i), SamplingParams(max_tokens=5 + i % 7, seed=i))
    tokens: dict[str, list[int]] = {}
    simulated = 0.0
    cost_model = CostModel(TINY_CPU)
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        simulated += engine.last_step.elapsed_s
    assert {len(v) for v in tokens.values()} == set(
        range(5, 12)
    )  # max_tokens always: fakes are never EOS
    assert all(257 not in v for v in tokens.values())
    assert simulated > 0
    # deterministic in (seed, position): a second run gives the same tokens
    again = make_simulated_engine("tiny-cpu", num_kv_blocks=64)
    assert (
        again.generate([[1] * 10], SamplingParams(max_tokens=5, seed=0))[0].new_token_ids
        == tokens["r0"]
    )
    assert cost_model.step_time(batch((10, 1))) == engine.executor.step_time(batch((10, 1)))
