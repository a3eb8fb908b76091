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
from services.worker.engine.attention import (
    PagedAttention,
    build_attention_metadata,
    int_tensor,
    upload_metadata,
)
from services.worker.engine.kv_cache import KVCache
from services.worker.engine.model import LlamaModel
from services.worker.engine.sampler import sample
from services.worker.engine.scheduler import ScheduledRequest, SchedulerOutput
from services.worker.engine.staging import StepUploader


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
    when it drops or restores layers (layer_ranges.py).

    With an `uploader` (a CUDA engine) a step's inputs are built on the host and reach
    the device in one non-blocking copy from pinned memory (staging.StepUploader), and
    nothing in the layers waits for the host: the step's one synchronisation is the
    sampler's. Without one (the CPU) they are built where the model runs."""

    def __init__(
        self, model: LlamaModel, kv_cache: KVCache, uploader: StepUploader | None = None
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = kv_cache.block_size
        self.uploader = uploader

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
        staged = self.uploader is not None
        built_on = "cpu" if staged else device
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
            device=built_on,
            kernels=model.kernels,
            with_bias=not staged,
        )
        sampling = self._sampling(batch, order) if model.is_last_stage else []
        inputs = [
            int_tensor(token_ids, torch.int64, built_on),
            int_tensor(positions, torch.int64, built_on),
            int_tensor([row for row, _ in sampling], torch.int64, built_on),
        ]
        if staged:
            metadata, inputs = upload_metadata(metadata, self.uploader, inputs)
        token_tensor, position_tensor, sample_rows = inputs
        if model.is_first_stage:
            hidden = model.embed(token_tensor)
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
            position_tensor,
            PagedAttention(model.config, self.kv_cache, metadata),
            paged_kv=paged_kv,
        )
        if not model.is_last_stage:
            return ExecutorOutput([], hidden, time.perf_counter() - start)
        if not sampling:
            return ExecutorOutput([], None, time.perf_counter() - start)
        logits = model.compute_logits(hidden.index_select(0, sample_rows))  # (R, V)
        sampled_token_ids = sample(
            logits, [r.params for _, r in sampling], [r.num_context_tokens for _, r in sampling]
        )
        return ExecutorOutput(sampled_token_ids, None, time.perf_counter() - start)

    @staticmethod
    def _sampling(batch: SchedulerOutput, order: list[int]) -> list[tuple[int, ScheduledRequest]]:
        """(row of its last token in the flat, reordered batch, request) of every request
        that samples this step, in batch order."""
        last_row: dict[int, int] = {}
        row = 0
        for i in order:
            row += len(batch.requests[i].token_ids)
            last_row[i] = row - 1
        return [(last_row[i], r) for i, r in enumerate(batch.requests) if r.is_sampling]
