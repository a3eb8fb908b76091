"""What stands behind an engine's held layers (KunServe drop / restore / group):

    TorchLayers      a torch engine's weights (LlamaModel) and KV pool (KVCache), changed
                     in place: dropped tensors are freed, restored ones rebuilt
    SimulatedLayers  a simulated engine's byte counts and cost-model share of the layers

LayerRanges (layer_ranges.py) does the block accounting and calls these.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import torch

from services.worker.engine.config import DTYPE_NBYTES, ModelConfig
from services.worker.engine.cost_model import CostModel
from services.worker.engine.errors import EngineStateError
from services.worker.engine.kv_cache import KVCache
from services.worker.engine.model import LlamaModel
from services.worker.engine.stage_weights import StageWeights
from services.worker.engine.weights import (
    WeightSource,
    build_embedding,
    build_head,
    build_layer_weights,
    hf_names,
    to_hf_tensors,
)


class HeldLayers(Protocol):
    """What stands behind the held layers: a torch engine's weights and KV pool
    (TorchLayers), or a simulated engine's byte counts and cost model (SimulatedLayers).
    LayerRanges does the accounting and calls these in this order:

        drop:        drop(keep_start, keep_end, keep_host_copy); resize_kv(num_blocks)
        restore:     restore(weights, num_blocks, moves)
        join_group:  drop(keep_start, keep_end, keep_host_copy); remap_kv(num_blocks, moves)
        leave_group: remap_kv(num_blocks, moves); restore(weights, num_blocks, {})
    """

    def weight_nbytes(self, layer_start: int, layer_end: int) -> int:
        """Bytes of the weights held while holding [layer_start, layer_end) (the range
        held, or one within it: what a drop to that range would keep)."""
        ...

    def steps_alone(self, layer_start: int, layer_end: int) -> bool:
        """Whether an engine holding [layer_start, layer_end) can step on its own."""
        ...

    def drop(self, keep_start: int, keep_end: int, keep_host_copy: bool) -> None: ...

    def resize_kv(self, num_blocks: int) -> None: ...

    def remap_kv(self, num_blocks: int, moves: Mapping[int, int]) -> None:
        """The held layers' KV in a pool of num_blocks blocks, block old at moves[old]."""
        ...

    def restore(
        self, weights: Mapping[str, torch.Tensor] | None, num_blocks: int, moves: dict[int, int]
    ) -> None: ...

    def hf_tensors(self) -> dict[str, torch.Tensor]:
        """The held weights under their HF names (for a peer that restores them)."""
        ...


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
        model = self.model
        if (layer_start, layer_end) == (model.layer_start, model.layer_end):
            return model.nbytes()
        return self._kept(layer_start, layer_end).nbytes()  # the real tensors' bytes

    def steps_alone(self, layer_start: int, layer_end: int) -> bool:
        """Only with every layer: a stage without the embedding or the lm_head runs in a
        pipeline (TorchExecutor.execute with hidden states)."""
        return layer_start == 0 and layer_end == self.model.config.num_layers

    def _kept(self, keep_start: int, keep_end: int) -> StageWeights:
        """The held tensors a stage keeping [keep_start, keep_end) keeps (no copies)."""
        old = self.model.weights
        is_last = keep_end == self.model.config.num_layers
        return StageWeights(
            keep_start,
            keep_end,
            {i: w for i, w in old.layers.items() if keep_start <= i < keep_end},
            old.embed_tokens if keep_start == 0 else None,
            old.norm if is_last else None,
            old.lm_head if is_last else None,
        )

    def drop(self, keep_start: int, keep_end: int, keep_host_copy: bool) -> None:
        config, old = self.model.config, self.model.weights
        is_last = keep_end == config.num_layers
        weights = self._kept(keep_start, keep_end)
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
            staging = self.kv_cache.staging
            self.host_weights.update(
                {
                    k: t.clone() if staging is None else staging.copy_to_host(t)
                    for k, t in host.items()
                }
            )
        self.model.set_weights(weights)
        del old
        self.kv_cache.drop_layers(keep_start, keep_end)

    def resize_kv(self, num_blocks: int) -> None:
        self.kv_cache.resize(num_blocks)

    def remap_kv(self, num_blocks: int, moves: Mapping[int, int]) -> None:
        self.kv_cache.remap(num_blocks, moves)

    def hf_tensors(self) -> dict[str, torch.Tensor]:
        """Views of the held weights (a matrix the native kernels packed: an unpacked copy)."""
        return to_hf_tensors(self.model.config, self.model.weights)

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

    def remap_kv(self, num_blocks: int, moves: Mapping[int, int]) -> None:
        del num_blocks, moves  # no tensors

    def hf_tensors(self) -> dict[str, torch.Tensor]:
        raise EngineStateError("a simulated engine holds no weight tensors")

    def restore(
        self, weights: Mapping[str, torch.Tensor] | None, num_blocks: int, moves: dict[int, int]
    ) -> None:
        del weights, num_blocks, moves  # no tensors
        self.cost_model.layer_fraction = 1.0
