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
from typing import Protocol

import torch

from services.worker.engine.block_manager import BlockManager
from services.worker.engine.config import DTYPE_NBYTES, ModelConfig
from services.worker.engine.cost_model import CostModel
from services.worker.engine.errors import EngineStateError, InvalidRequestStateError
from services.worker.engine.kv_cache import KVCache, kv_block_nbytes
from services.worker.engine.model import LlamaModel
from services.worker.engine.request import RequestStatus
from services.worker.engine.scheduler import Scheduler
from services.worker.engine.stage_weights import StageWeights
from services.worker.engine.weights import (
    WeightSource,
    build_embedding,
    build_head,
    build_layer_weights,
    hf_names,
    to_hf_tensors,
)


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


class HeldLayers(Protocol):
    """What stands behind the held layers: a torch engine's weights and KV pool
    (TorchLayers), or a simulated engine's byte counts and cost model (SimulatedLayers).
    LayerRanges does the accounting and calls these in this order:

        drop:     drop(keep_start, keep_end, keep_host_copy); resize_kv(num_blocks)
        restore:  restore(weights, num_blocks, moves)
    """

    def weight_nbytes(self, layer_start: int, layer_end: int) -> int:
        """Bytes of the weights held while holding [layer_start, layer_end)."""
        ...

    def steps_alone(self, layer_start: int, layer_end: int) -> bool:
        """Whether an engine holding [layer_start, layer_end) can step on its own."""
        ...

    def drop(self, keep_start: int, keep_end: int, keep_host_copy: bool) -> None: ...

    def resize_kv(self, num_blocks: int) -> None: ...

    def restore(
        self, weights: Mapping[str, torch.Tensor] | None, num_blocks: int, moves: dict[int, int]
    ) -> None: ...


class TorchLayers:
    """A torch engine's held layers: the model's weights and the KV pool's layer slices.
    `model` and `kv_cache` are the engine's own (its executor runs them), changed in place."""

    def __init__(
        self,
        model: LlamaModel,
        kv_cache: KVCache,
        weight_source: WeightSource,
        dtype: str,
        device: str,
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.weight_source = weight_source  # where restore_layers reads dropped weights
        self.dtype = dtype
        self.device = device
        self.host_weights: dict[str, torch.Tensor] = {}  # dropped weights kept for restore

    def weight_nbytes(self, layer_start: int, layer_end: int) -> int:
        del layer_start, layer_end  # the model holds exactly them: count its tensors
        return self.model.nbytes()

    def steps_alone(self, layer_start: int, layer_end: int) -> bool:
        """Only with every layer: a stage without the embedding or the lm_head runs in a
        pipeline (TorchExecutor.execute with hidden states)."""
        return layer_start == 0 and layer_end == self.model.config.num_layers

    def drop(self, keep_start: int, keep_end: int, keep_host_copy: bool) -> None:
        config, old = self.model.config, self.model.weights
        is_last = keep_end == config.num_layers
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
            host = to_hf_tensors(config, dropped)
            self.host_weights.update({k: t.to("cpu", copy=True) for k, t in host.items()})
        self.model.set_weights(weights)
        del old
        self.kv_cache.drop_layers(keep_start, keep_end)

    def resize_kv(self, num_blocks: int) -> None:
        self.kv_cache.resize(num_blocks)

    def restore(
        self, weights: Mapping[str, torch.Tensor] | None, num_blocks: int, moves: dict[int, int]
    ) -> None:
        config, held = self.model.config, self.model.weights
        num_layers = config.num_layers
        held_names = set(hf_names(config, held.layer_start, held.layer_end))
        missing = [n for n in hf_names(config, 0, num_layers) if n not in held_names]
        if weights is None and all(name in self.host_weights for name in missing):
            weights = self.host_weights
        if weights is None:
            weights = self.weight_source.load(missing)
        self.model.set_weights(self._complete_weights(weights))
        self.kv_cache.resize(num_blocks, moves)
        self.kv_cache.add_layers(0, num_layers)
        self.host_weights = {}

    def _complete_weights(self, tensors: Mapping[str, torch.Tensor]) -> StageWeights:
        """The held weights plus the dropped ones, built from `tensors` (HF names)."""
        config, dtype, device = self.model.config, self.dtype, self.device
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


class SimulatedLayers:
    """A simulated engine's held layers: weight bytes from the model's shape, and the
    cost model's share of the layers (its executor's), so a stage's step takes its share
    of the time."""

    def __init__(self, model_config: ModelConfig, dtype: str, cost_model: CostModel) -> None:
        self.model_config = model_config
        self.dtype = dtype
        self.cost_model = cost_model

    def weight_nbytes(self, layer_start: int, layer_end: int) -> int:
        return self.model_config.num_params(layer_start, layer_end) * DTYPE_NBYTES[self.dtype]

    def steps_alone(self, layer_start: int, layer_end: int) -> bool:
        del layer_start, layer_end
        return True  # a stage's modelled step: its share of the layers' time

    def drop(self, keep_start: int, keep_end: int, keep_host_copy: bool) -> None:
        del keep_host_copy  # no tensors
        self.cost_model.layer_fraction = (keep_end - keep_start) / self.model_config.num_layers

    def resize_kv(self, num_blocks: int) -> None:
        del num_blocks  # no tensors

    def restore(
        self, weights: Mapping[str, torch.Tensor] | None, num_blocks: int, moves: dict[int, int]
    ) -> None:
        del weights, num_blocks, moves  # no tensors
        self.cost_model.layer_fraction = 1.0


class LayerRanges:
    """Which layers the engine holds, and drop_layers / restore_layers over its block
    manager, scheduler (requests to preempt) and `held` (the tensors, or their stand-in)."""

    def __init__(
        self,
        model_config: ModelConfig,
        dtype: str,
        block_manager: BlockManager,
        scheduler: Scheduler,
        held: HeldLayers,
    ) -> None:
        self.model_config = model_config
        self.dtype = dtype
        self.block_manager = block_manager
        self.scheduler = scheduler
        self.held = held
        self.layer_start, self.layer_end = 0, model_config.num_layers
        self.num_blocks_complete = block_manager.num_total_blocks  # the restore target

    @property
    def is_complete(self) -> bool:
        """Whether this engine holds every layer."""
        return self.layer_start == 0 and self.layer_end == self.model_config.num_layers

    @property
    def steps_alone(self) -> bool:
        """Whether LLMEngine.step() can run (else: a pipeline stage, or restore first)."""
        return self.held.steps_alone(self.layer_start, self.layer_end)

    @property
    def weight_nbytes(self) -> int:
        """Bytes of weights held (real tensor sizes; analytic for a simulated engine)."""
        return self.held.weight_nbytes(self.layer_start, self.layer_end)

    @property
    def kv_block_nbytes(self) -> int:
        """Bytes of one KV block over the layers held."""
        return kv_block_nbytes(
            self.model_config,
            self.layer_end - self.layer_start,
            self.block_manager.block_size,
            self.dtype,
        )

    def drop_layers(
        self, keep_start: int, keep_end: int, keep_host_copy: bool = False
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
        self.held.drop(keep_start, keep_end, keep_host_copy)
        self.layer_start, self.layer_end = keep_start, keep_end
        pool_bytes = num_blocks_before * block_before + (weight_before - self.weight_nbytes)
        num_blocks = pool_bytes // self.kv_block_nbytes
        self.held.resize_kv(num_blocks)
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
        self,
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
        self.held.restore(weights, num_blocks, moves)
        self.layer_start, self.layer_end = 0, num_layers
        self.block_manager.shrink(num_blocks, moves)
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
