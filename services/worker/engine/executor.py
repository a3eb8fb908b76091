"""Executors run one scheduled step. Two implementations share the interface:

    execute(batch, hidden_states=None) -> ExecutorOutput

TorchExecutor runs the real model over the paged KV pool (LLMEngine.from_config);
CostModelExecutor (cost_model.py) returns deterministic fake tokens and a modelled
duration (LLMEngine.simulated).

A TorchExecutor over a model holding layers [start, end) is one pipeline stage: it
embeds tokens only if start == 0 (else it takes the previous stage's hidden states)
and samples only if end == num_layers (else it returns hidden states). Rows of
hidden states are in batch_row_order(batch), the same on every stage.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import torch

from services.worker.engine import native
from services.worker.engine.attention import PagedAttention, build_attention_metadata, int_tensor
from services.worker.engine.kv_cache import KVCache
from services.worker.engine.model import LlamaModel
from services.worker.engine.sampler import sample
from services.worker.engine.scheduler import ScheduledRequest, SchedulerOutput


@dataclass
class ExecutorOutput:
    sampled_token_ids: list[int]  # one per is_sampling request, in batch order (last stage)
    hidden_states: torch.Tensor | None  # (T, H) rows in batch_row_order (non-last stage)
    elapsed_s: float  # wall time (torch) or modelled time (cost model)


class Executor(Protocol):
    def execute(
        self, batch: SchedulerOutput, hidden_states: torch.Tensor | None = None
    ) -> ExecutorOutput: ...


def batch_row_order(batch: SchedulerOutput) -> list[int]:
    """Indices into batch.requests: single-token chunks first, then longer chunks."""
    requests = batch.requests
    singles = [i for i, r in enumerate(requests) if len(r.token_ids) == 1]
    return singles + [i for i, r in enumerate(requests) if len(r.token_ids) > 1]


class TorchExecutor:
    """Runs `model` over `kv_cache`. Both are the engine's own objects, changed in place
    when it drops or restores layers (layer_ranges.py)."""

    def __init__(self, model: LlamaModel, kv_cache: KVCache) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = kv_cache.block_size

    @property
    def kernels(self) -> str:
        """The model's kernels: "native" or "torch"."""
        return self.model.kernels

    @torch.inference_mode()
    def execute(
        self, batch: SchedulerOutput, hidden_states: torch.Tensor | None = None
    ) -> ExecutorOutput:
        start = time.perf_counter()
        model, device = self.model, self.model.device
        order = batch_row_order(batch)
        requests = [batch.requests[i] for i in order]
        num_decode = sum(1 for r in requests if len(r.token_ids) == 1)

        token_ids: list[int] = []
        positions: list[int] = []
        for r in requests:
            token_ids += r.token_ids
            positions += range(r.num_computed_tokens, r.num_context_tokens)
        metadata = build_attention_metadata(
            decodes=[(r.num_computed_tokens, r.block_ids) for r in requests[:num_decode]],
            prefills=[
                (r.num_computed_tokens, len(r.token_ids), r.block_ids)
                for r in requests[num_decode:]
            ],
            block_size=self.block_size,
            num_queries_per_kv=model.config.num_queries_per_kv,
            device=device,
            kernels=model.kernels,
        )
        if model.is_first_stage:
            hidden = model.embed(int_tensor(token_ids, torch.int64, device))
        else:
            if hidden_states is None:
                raise ValueError(
                    "a stage without the embedding needs the previous stage's hidden states"
                )
            hidden = hidden_states
        paged_kv = None
        if metadata.native is not None:  # the native kernels: the layers in one call
            paged_kv = native.PagedKV(self.kv_cache.layers, metadata.slot_mapping, metadata.native)
        hidden = model.forward_layers(
            hidden,
            int_tensor(positions, torch.int64, device),
            PagedAttention(model.config, self.kv_cache, metadata),
            paged_kv=paged_kv,
        )
        if not model.is_last_stage:
            return ExecutorOutput([], hidden, time.perf_counter() - start)

        sampled_token_ids = self._sample(batch, order, hidden)
        return ExecutorOutput(sampled_token_ids, None, time.perf_counter() - start)

    def _sample(self, batch: SchedulerOutput, order: list[int], hidden: torch.Tensor) -> list[int]:
        # Last row of each sampling request, found in the flat (reordered) batch.
        last_row: dict[int, int] = {}
        row = 0
        for i in order:
            row += len(batch.requests[i].token_ids)
            last_row[i] = row - 1
        sampling: list[tuple[int, ScheduledRequest]] = [
            (i, r) for i, r in enumerate(batch.requests) if r.is_sampling
        ]
        if not sampling:
            return []
        rows = int_tensor([last_row[i] for i, _ in sampling], torch.int64, hidden.device)
        logits = self.model.compute_logits(hidden.index_select(0, rows))  # (R, V)
        return sample(
            logits, [r.params for _, r in sampling], [r.num_context_tokens for _, r in sampling]
        )
