"""Batched token sampling: greedy rows by argmax, the rest by inverse-CDF with one
deterministic uniform per row (see sampling_params.uniform_for)."""

from __future__ import annotations

import torch

from services.worker.engine.sampling_params import SamplingParams, uniform_for


def sample(logits: torch.Tensor, params: list[SamplingParams], positions: list[int]) -> list[int]:
    """Picks one token per row of `logits` (R, V).

    params[i] must carry a seed when it is not greedy (the engine fills one in at
    admission); positions[i] is the index of the token being sampled.
    """
    tokens = torch.argmax(logits, dim=-1)  # (R,)
    sampled_rows = [i for i, p in enumerate(params) if not p.is_greedy]
    if not sampled_rows:
        return tokens.tolist()
    rows = torch.tensor(sampled_rows, dtype=torch.long, device=logits.device)
    picked = _sample_rows(
        logits.index_select(0, rows).float(),
        [params[i] for i in sampled_rows],
        [positions[i] for i in sampled_rows],
    )
    tokens[rows] = picked
    return tokens.tolist()


def _sample_rows(
    logits: torch.Tensor, params: list[SamplingParams], positions: list[int]
) -> torch.Tensor:
    """logits (S, V) float32 -> (S,) token ids."""
    device = logits.device
    temperatures = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)
    logits = logits / temperatures[:, None]

    top_ks = [p.top_k for p in params]
    if any(top_ks):
        vocab_size = logits.shape[-1]
        ks = torch.tensor([k if 0 < k < vocab_size else vocab_size for k in top_ks], device=device)
        top_values = torch.topk(logits, int(ks.max()), dim=-1).values  # (S, max_k)
        kth = top_values.gather(1, (ks - 1)[:, None])  # (S, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))

    probs = torch.softmax(logits, dim=-1)
    # Stable descending sort: ties keep vocab order, so the CDF is canonical.
    sorted_probs, sorted_ids = torch.sort(probs, dim=-1, descending=True, stable=True)  # (S, V)
    cumulative = torch.cumsum(sorted_probs, dim=-1)
    top_ps = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device)
    # Drop a token when the tokens before it already reach top_p (the first always stays).
    sorted_probs = sorted_probs.masked_fill((cumulative - sorted_probs) > top_ps[:, None], 0.0)
    cumulative = torch.cumsum(sorted_probs, dim=-1)

    uniforms = torch.tensor(
        [uniform_for(p.seed or 0, pos) for p, pos in zip(params, positions, strict=True)],
        dtype=torch.float32,
        device=device,
    )
    thresholds = uniforms * cumulative[:, -1]  # (S,)
    choice = torch.searchsorted(cumulative, thresholds[:, None], right=True)  # (S, 1)
    num_kept = (sorted_probs > 0).sum(dim=-1, keepdim=True)
    choice = torch.minimum(choice, num_kept - 1)
    return sorted_ids.gather(1, choice).squeeze(1)
