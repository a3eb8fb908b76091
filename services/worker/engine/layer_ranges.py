"""KunServe hooks of the engine: drop a layer range's weights and KV, and restore them;
join a group (a pipeline of members sharing one block id space) and leave it.

    before   layers [0 ....................... L)   N blocks of b bytes (all layers)
    drop     layers      [keep_start, keep_end)      N' = (N*b + freed weight bytes) // b'
                                                     blocks of b' = b * kept / L bytes
    restore  layers [0 ....................... L)   back to N blocks

Block ids survive a drop (the pool only grows). A restore moves request blocks whose
ids are >= N into free ids below N first; the restored layers' KV is zero, so by
default every request holding KV is preempted to recompute it (a caller that writes
the KV slices back itself passes recompute=False).

A group (pipeline.py has the split and the pool plan) re-lays the pool instead:

    join_group   member r keeps [start_r, end_r); its old block i becomes group block
                 offset_r + i of a pool of num_group_blocks blocks (same count on every
                 member, each block holding that member's layers only)
    leave_group  every layer back, num_blocks_complete blocks; group block g becomes
                 local block block_map[g] (kept layers copied, the others zero until
                 the caller writes what the other members send)

Both need an engine without requests: the caller exports and removes them first and
imports them afterwards at the new ids (migration.import_request_at).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from services.worker.engine.block_manager import BlockManager
from services.worker.engine.config import ModelConfig
from services.worker.engine.errors import (
    EngineStateError,
    GroupCapacityError,
    InvalidBlocksError,
    InvalidLayerRangeError,
    InvalidRequestStateError,
)
from services.worker.engine.held_layers import HeldLayers
from services.worker.engine.kv_cache import kv_block_nbytes
from services.worker.engine.request import RequestStatus
from services.worker.engine.scheduler import Scheduler


@dataclass(frozen=True)
class LayerChange:
    """Byte and block accounting of one drop, restore, join or leave of a group."""

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
    """Which layers the engine holds, and drop_layers / restore_layers / join_group /
    leave_group over its block manager, scheduler (requests to preempt, or to check there
    are none) and `held` (the tensors, or their stand-in).

    memory_nbytes: the bytes the engine may hold, weights and KV pool together (its
    memory_capacity_bytes); None when its pool was sized exactly (num_kv_blocks): then
    what it holds now."""

    def __init__(
        self,
        model_config: ModelConfig,
        dtype: str,
        block_manager: BlockManager,
        scheduler: Scheduler,
        held: HeldLayers,
        memory_nbytes: int | None = None,
    ) -> None:
        self.model_config = model_config
        self.dtype = dtype
        self.block_manager = block_manager
        self.scheduler = scheduler
        self.held = held
        self.layer_start, self.layer_end = 0, model_config.num_layers
        self.num_blocks_complete = block_manager.num_total_blocks  # the restore target
        if memory_nbytes is None:
            memory_nbytes = self.weight_nbytes + self.num_blocks_complete * self.kv_block_nbytes
        self.memory_nbytes = memory_nbytes  # what a group member's pool grows into

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

    # ---- KunServe group -------------------------------------------------------------

    def _check_keep(self, keep_start: int, keep_end: int) -> None:
        if not (
            isinstance(keep_start, int)
            and isinstance(keep_end, int)
            and self.layer_start <= keep_start < keep_end <= self.layer_end
        ):
            raise InvalidLayerRangeError(
                f"cannot keep layers [{keep_start}, {keep_end}): this engine holds "
                f"[{self.layer_start}, {self.layer_end})"
            )

    def _check_no_requests(self, action: str) -> None:
        if self.scheduler.requests or self.block_manager.num_used_blocks:
            raise EngineStateError(
                f"{action} needs an engine without requests or reserved blocks "
                f"({len(self.scheduler.requests)} requests, "
                f"{self.block_manager.num_used_blocks} blocks in use): export and remove them"
            )

    def group_capacity(self, keep_start: int, keep_end: int) -> int:
        """Blocks this engine's pool would hold if it kept only [keep_start, keep_end):
        (memory_nbytes - the kept weights' bytes) // one block's bytes over the kept
        layers. Pure arithmetic over the real tensor sizes; changes nothing."""
        self._check_keep(keep_start, keep_end)
        block_nbytes = kv_block_nbytes(
            self.model_config, keep_end - keep_start, self.block_manager.block_size, self.dtype
        )
        return (self.memory_nbytes - self.held.weight_nbytes(keep_start, keep_end)) // block_nbytes

    def join_group(
        self,
        keep_start: int,
        keep_end: int,
        num_group_blocks: int,
        block_offset: int,
        keep_host_copy: bool = False,
    ) -> LayerChange:
        """Becomes a group member keeping layers [keep_start, keep_end): frees the other
        layers' weights and KV slices, and lays the kept layers' KV out again so that
        old block i is block block_offset + i of a pool of num_group_blocks blocks (the
        group's ids, valid on every member); the block manager starts over with all of
        them free. Only without requests (export and remove them first)."""
        self._check_keep(keep_start, keep_end)
        self._check_no_requests("join_group")
        num_blocks_before = self.block_manager.num_total_blocks
        for name, value in (("num_group_blocks", num_group_blocks), ("block_offset", block_offset)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise GroupCapacityError(f"{name} must be an int >= 0, got {value!r}")
        if block_offset + num_blocks_before > num_group_blocks:
            raise GroupCapacityError(
                f"a pool of {num_group_blocks} group blocks cannot take this engine's "
                f"{num_blocks_before} blocks at offset {block_offset}"
            )
        capacity = self.group_capacity(keep_start, keep_end)
        if num_group_blocks > capacity:
            raise GroupCapacityError(
                f"keeping layers [{keep_start}, {keep_end}), this engine holds at most "
                f"{capacity} blocks, not {num_group_blocks}"
            )
        weight_before, block_before = self.weight_nbytes, self.kv_block_nbytes
        self.held.drop(keep_start, keep_end, keep_host_copy)
        self.layer_start, self.layer_end = keep_start, keep_end
        moves = {i: block_offset + i for i in range(num_blocks_before)}
        self.held.remap_kv(num_group_blocks, moves)
        self.block_manager.reset(num_group_blocks)
        return LayerChange(
            keep_start,
            keep_end,
            weight_before,
            self.weight_nbytes,
            block_before,
            self.kv_block_nbytes,
            num_blocks_before,
            num_group_blocks,
        )

    def leave_group(
        self,
        block_map: Mapping[int, int],
        weights: Mapping[str, torch.Tensor] | None = None,
    ) -> LayerChange:
        """Holds every layer again, in a pool of num_blocks_complete blocks: the kept
        layers' KV of group block g is copied to local block block_map[g], every other
        block and the restored layers' KV are zero (the caller writes the slices other
        members send: migration.write_kv_blocks(local_ids, data, layer_start)). Weights
        come from `weights` (HF names, e.g. received from peers), else the host copy
        join_group kept, else the model's source. Only without requests."""
        if self.is_complete:
            raise InvalidLayerRangeError("no layers are dropped")
        self._check_no_requests("leave_group")
        num_blocks = self.num_blocks_complete
        group_ids, local_ids = list(block_map), list(block_map.values())
        for ids, total, what in (
            (group_ids, self.block_manager.num_total_blocks, "group"),
            (local_ids, num_blocks, "local"),
        ):
            if len(set(ids)) != len(ids) or not all(
                isinstance(b, int) and not isinstance(b, bool) and 0 <= b < total for b in ids
            ):
                raise InvalidBlocksError(
                    f"{what} block ids must be distinct ints in [0, {total}), got {ids}"
                )
        weight_before, block_before = self.weight_nbytes, self.kv_block_nbytes
        num_blocks_before = self.block_manager.num_total_blocks
        self.held.remap_kv(num_blocks, block_map)  # shrinks the pool before weights arrive
        self.held.restore(weights, num_blocks, {})
        self.layer_start, self.layer_end = 0, self.model_config.num_layers
        self.block_manager.reset(num_blocks)
        return LayerChange(
            0,
            self.layer_end,
            weight_before,
            self.weight_nbytes,
            block_before,
            self.kv_block_nbytes,
            num_blocks_before,
            num_blocks,
        )

    def export_weights(self) -> dict[str, torch.Tensor]:
        """The held weights under their HF names, for a member that leaves the group
        (leave_group's `weights`) or restores (views; packed matrices: unpacked copies)."""
        return self.held.hf_tensors()
