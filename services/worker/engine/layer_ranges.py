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

import torch

from services.worker.engine.block_manager import BlockManager
from services.worker.engine.config import ModelConfig
from services.worker.engine.errors import EngineStateError, InvalidRequestStateError
from services.worker.engine.held_layers import HeldLayers
from services.worker.engine.kv_cache import kv_block_nbytes
from services.worker.engine.request import RequestStatus
from services.worker.engine.scheduler import Scheduler


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
