"""Deterministic sampling: the random stream is a function of (seed, position) only."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from services.worker.engine import RequestState, SamplingParams
from services.worker.engine.sampler import sample
from services.worker.engine.sampling_params import uniform_for

LOGITS = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))


def test_uniform_stream_is_fixed_across_machines():
    assert uniform_for(0, 0) == 0.6524484863740322
    assert uniform_for(42, 7) == 0.08603176010658542
    assert uniform_for(-1, 10**6) == 0.7229639133003825
    values = [uniform_for(5, position) for position in range(2000)]
    assert all(0.0 <= v < 1.0 for v in values)
    assert abs(sum(values) / len(values) - 0.5) < 0.03


def expected_token(probs: list[float], u: float) -> int:
    cumulative = 0.0
    for token, p in enumerate(probs):
        cumulative += p
        if u * sum(probs) < cumulative:
            return token
    return len(probs) - 1


def test_inverse_cdf_picks_the_token_the_uniform_lands_on():
    for seed in range(200):
        params = SamplingParams(temperature=1.0, seed=seed)
        u = uniform_for(seed, 17)
        assert sample(LOGITS, [params], [17]) == [expected_token([0.5, 0.3, 0.2], u)]


def test_top_p_and_top_k_cut_the_tail():
    for seed in range(100):
        u = uniform_for(seed, 3)
        top_p = SamplingParams(temperature=1.0, top_p=0.6, seed=seed)  # keeps 0.5 and 0.3
        assert sample(LOGITS, [top_p], [3]) == [expected_token([0.5, 0.3], u)]
        top_k = SamplingParams(temperature=1.0, top_k=2, seed=seed)
        assert sample(LOGITS, [top_k], [3]) == [expected_token([0.5, 0.3], u)]
        assert sample(LOGITS, [SamplingParams(temperature=1.0, top_k=1, seed=seed)], [3]) == [0]


def test_temperature_sharpens_the_distribution():
    probs = [math.exp(math.log(p) / 0.5) for p in (0.5, 0.3, 0.2)]  # T = 0.5
    for seed in range(100):
        params = SamplingParams(temperature=0.5, seed=seed)
        assert sample(LOGITS, [params], [9]) == [expected_token(probs, uniform_for(seed, 9))]


def test_a_row_samples_the_same_whatever_else_is_in_the_batch():
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    params = [
        SamplingParams(temperature=0.7 + i / 10, top_p=0.9, top_k=i * 5, seed=100 + i)
        for i in range(5)
    ]
    params.append(SamplingParams())  # greedy
    positions = [11, 12, 13, 14, 15, 16]
    together = sample(logits, params, positions)
    alone = [sample(logits[i : i + 1], [params[i]], [positions[i]])[0] for i in range(6)]
    assert together == alone
    assert together[5] == int(logits[5].argmax())


def test_params_and_state_are_frozen_plain_data():
    params = SamplingParams(
        max_tokens=3, temperature=0.5, top_p=0.8, top_k=4, seed=9, stop_token_ids=[3, 4]
    )
    assert params.stop_token_ids == (3, 4)  # a list given is kept as a tuple
    state = RequestState(
        "r", (1, 2), (3,), params, priority=1, num_computed_tokens=2, arrival_time=5.0
    )
    assert state.num_tokens == 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        state.num_computed_tokens = 3  # type: ignore[misc]
