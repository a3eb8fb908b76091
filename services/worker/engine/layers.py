"""KunServe hooks of the engine: drop a layer range's weights and KV, and restore them.

    before   layers [0 ....................... L)   N blocks of b bytes (all layers)
    drop     layers      [keep_start, keep_end)      N' = (N*b + freed weight bytes) // b'
                                                     blocks of b' = b * kept / L bytes
    restore  layers [0 ....................... L)   back to N blocks

Block ids survive a drop (the pool only grows). A restore moves request blocks whose
ids are >= N into free ids below N first; the restored layers' KV is zero, so by
default every request holding KV is preempted to recompute it (a caller that writes
the KV slices back itself passes recompute=False).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from services.worker.engine.cost_model import CostModelExecutor
from services.worker.engine.errors import EngineStateError, InvalidRequestStateError
from services.worker.engine.executor import TorchExecutor
from services.worker.engine.model import LlamaModel, StageWeights
from services.worker.engine.request import RequestStatus
from services.worker.engine.weights import (
    build_embedding,
    build_head,
    build_layer_weights,
    hf_names,
    to_hf_tensors,
)

if TYPE_CHECKING:
    from services.worker.engine.engine import LLMEngine


@dataclass(frozen=True)
class LayerChange:
    """Byte and block accounting of one drop or restore."""

    layer_start: int  # held range after the change
    layer_end: int
    weight_nbytes_before: int
    weight_nbytes_after: int
    kv_block_nbytes_before: int
    kv_block_nbytes_after: int
    num_total_blocks_before: int
    num_total_blocks_after: int

    @property
    def freed_weight_nbytes(self) -> int:
        return self.weight_nbytes_before - self.weight_nbytes_after


class LayerRangeMixin:
    """drop_layers / restore_layers for LLMEngine (kept apart to keep engine.py small)."""

    @property
    def is_complete(self: LLMEngine) -> bool:
        """Whether this engine holds every layer (and so can step on its own)."""
        return self.layer_start == 0 and self.layer_end == self.model_config.num_layers

    def drop_layers(
        self: LLMEngine, keep_start: int, keep_end: int, keep_host_copy: bool = False
    ) -> LayerChange:
        """Keeps only layers [keep_start, keep_end) (and the embedding / head only if the
        range starts / ends the model); the freed bytes become new KV blocks.

        keep_host_copy saves the dropped weights in CPU memory for a fast restore. That
        only frees memory when the model lives on an accelerator (device != "cpu")."""
        if not self.layer_start <= keep_start < keep_end <= self.layer_end:
            raise InvalidRequestStateError(
                f"cannot keep layers [{keep_start}, {keep_end}): this engine holds "
                f"[{self.layer_start}, {self.layer_end})"
            )
        weight_before, block_before = self.weight_nbytes, self.kv_block_nbytes
        num_blocks_before = self.block_manager.num_total_blocks
        if self.model is not None:
            old = self.model.weights
            is_last = keep_end == self.model_config.num_layers
            weights = StageWeights(
                keep_start,
                keep_end,
                {i: w for i, w in old.layers.items() if keep_start <= i < keep_end},
                old.embed_tokens if keep_start == 0 else None,
                old.norm if is_last else None,
                old.lm_head if is_last else None,
            )
            if keep_host_copy:
                dropped = StageWeights(
                    keep_start,
                    keep_end,
                    {i: w for i, w in old.layers.items() if not keep_start <= i < keep_end},
                    old.embed_tokens if keep_start > 0 else None,
                    old.norm if not is_last else None,
                    old.lm_head if not is_last else None,
                )
                host = to_hf_tensors(self.model_config, dropped)
                self.host_weights.update({k: t.to("cpu", copy=True) for k, t in host.items()})
            self.model = LlamaModel(self.model_config, weights, self.model.native_ops)
            del old
            assert self.kv_cache is not None
            self.kv_cache.drop_layers(keep_start, keep_end)
        self.layer_start, self.layer_end = keep_start, keep_end
        pool_bytes = num_blocks_before * block_before + (weight_before - self.weight_nbytes)
        num_blocks = pool_bytes // self.kv_block_nbytes
        if self.kv_cache is not None:
            self.kv_cache.resize(num_blocks)
        self._sync_executor()
        self.block_manager.grow(num_blocks - num_blocks_before)
        return LayerChange(
            keep_start,
            keep_end,
            weight_before,
            self.weight_nbytes,
            block_before,
            self.kv_block_nbytes,
            num_blocks_before,
            num_blocks,
        )

    def restore_layers(
        self: LLMEngine,
        weights: Mapping[str, torch.Tensor] | None = None,
        recompute: bool = True,
    ) -> LayerChange:
        """Brings back every dropped layer, from `weights` (HF names, e.g. received from a
        peer), else the host copy drop_layers kept, else the model's source (checkpoint
        files, or the tiny seed)."""
        if self.is_complete:
            raise InvalidRequestStateError("no layers are dropped")
        if any(r.status is RequestStatus.SUSPENDED for r in self.scheduler.running):
            raise EngineStateError(
                "a request is suspended for migration; finish or resume it first"
            )
        num_layers = self.model_config.num_layers
        weight_before, block_before = self.weight_nbytes, self.kv_block_nbytes
        num_blocks_before = self.block_manager.num_total_blocks
        num_blocks = self.num_blocks_complete
        moves = self.block_manager.plan_shrink(num_blocks)  # raises if the used blocks do not fit

        if self.model is not None:
            held = set(hf_names(self.model_config, self.layer_start, self.layer_end))
            missing = [n for n in hf_names(self.model_config, 0, num_layers) if n not in held]
            if weights is None and all(name in self.host_weights for name in missing):
                weights = self.host_weights
            if weights is None:
                assert self.weight_source is not None
                weights = self.weight_source.load(missing)
            self.model = LlamaModel(
                self.model_config, self._complete_weights(weights), self.model.native_ops
            )
            assert self.kv_cache is not None
            self.kv_cache.resize(num_blocks, moves)
            self.kv_cache.add_layers(0, num_layers)
            self.host_weights = {}
        self.layer_start, self.layer_end = 0, num_layers
        self.block_manager.shrink(num_blocks, moves)
        self._sync_executor()
        if recompute:
            for request in [r for r in self.scheduler.running if r.num_computed_tokens > 0]:
                self.scheduler.preempt(request)
        return LayerChange(
            0,
            num_layers,
            weight_before,
            self.weight_nbytes,
            block_before,
            self.kv_block_nbytes,
            num_blocks_before,
            num_blocks,
        )

    def _complete_weights(self: LLMEngine, tensors: Mapping[str, torch.Tensor]) -> StageWeights:
        assert self.model is not None
        config, dtype, device = self.model_config, self.dtype, self.config.device
        old = self.model.weights
        layers = {
            i: old.layers[i]
            if i in old.layers
            else build_layer_weights(config, tensors, i, dtype, device)
            for i in range(config.num_layers)
        }
        if old.embed_tokens is not None:
            embed = old.embed_tokens
        elif config.tie_word_embeddings and old.lm_head is not None:
            embed = old.lm_head  # a last stage's copy of the tied embedding
        else:
            embed = build_embedding(tensors, dtype, device)
        if old.norm is not None and old.lm_head is not None:
            norm, lm_head = old.norm, old.lm_head
            if config.tie_word_embeddings:
                lm_head = embed  # drop the stage's separate copy
        else:
            norm, lm_head = build_head(config, tensors, dtype, device, embed)
        return StageWeights(0, config.num_layers, layers, embed, norm, lm_head)

    def _sync_executor(self: LLMEngine) -> None:
        if isinstance(self.executor, TorchExecutor):
            assert self.model is not None
            self.executor.model = self.model
        elif isinstance(self.executor, CostModelExecutor):
            held = self.layer_end - self.layer_start
            self.executor.cost_model.layer_fraction = held / self.model_config.num_layers
