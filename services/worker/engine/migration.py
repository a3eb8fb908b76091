"""Llumnix live-migration hooks of the engine.

Source side                                  Destination side
                                             reserve_blocks(n)        (handshake)
read_kv_blocks(blocks[a:b]) while decoding   write_kv_blocks(reserved[a:b], data)   (stages)
suspend_request(id)                          (stop-and-copy: last blocks + state)
export_request_state(id), read_kv_blocks     write_kv_blocks, import_request(state, reserved)
remove_request(id)                           (commit: the destination resumes decoding)
resume_request(id) if the migration aborts   release_blocks(reserved) if it aborts

A request mid-decode has num_computed_tokens == num_tokens - 1: its last sampled token
is fed on the destination, which then samples exactly what the source would have.

Threads: every hook runs between steps on the thread that steps the engine, except
read_kv_blocks and write_kv_blocks, which the worker runs on other threads while the
engine steps (services/worker/migration/). They copy the KV of the named blocks only,
which no step writes meanwhile: a running request's full blocks (its new tokens go to
later blocks), a suspended request's blocks, or blocks reserved here, which no request
owns. (A preemption can free a source's blocks mid-read: the source checks after each
stage that they are still the request's.) They must not overlap a drop_layers /
restore_layers, which reallocate the pool.
"""

from __future__ import annotations

import torch

from services.worker.engine.block_manager import BlockManager
from services.worker.engine.errors import (
    EngineStateError,
    InvalidBlocksError,
    InvalidLayerRangeError,
    InvalidRequestStateError,
    NoFreeBlocksError,
    UnknownRequestError,
)
from services.worker.engine.intake import RequestIntake
from services.worker.engine.kv_cache import KVCache
from services.worker.engine.request import Request, RequestState, RequestStatus
from services.worker.engine.scheduler import Scheduler


class EngineMigration:
    """The engine's migration hooks (`engine.migration`), over its scheduler, block
    manager and KV cache (None in a simulated engine: no KV to read or write)."""

    def __init__(
        self,
        scheduler: Scheduler,
        block_manager: BlockManager,
        kv_cache: KVCache | None,
        intake: RequestIntake,
        eos_token_ids: tuple[int, ...],
    ) -> None:
        self.scheduler = scheduler
        self.block_manager = block_manager
        self.kv_cache = kv_cache
        self.intake = intake
        self.eos_token_ids = eos_token_ids

    def _request(self, request_id: str) -> Request:
        request = self.scheduler.requests.get(request_id)
        if request is None:
            raise UnknownRequestError(f"no request {request_id!r} in the engine")
        return request

    def export_request_state(self, request_id: str) -> RequestState:
        return self._request(request_id).to_state()

    def request_block_ids(self, request_id: str) -> list[int]:
        self._request(request_id)
        return list(self.block_manager.block_ids(request_id))

    def _check_block_ids(self, block_ids: list[int]) -> None:
        total = self.block_manager.num_total_blocks
        if len(set(block_ids)) != len(block_ids) or not all(
            isinstance(b, int) and 0 <= b < total for b in block_ids
        ):
            raise InvalidBlocksError(
                f"block ids must be distinct ints in [0, {total}), got {block_ids}"
            )

    def _held_kv(self) -> KVCache:
        if self.kv_cache is None:
            raise EngineStateError("a simulated engine holds no KV tensors")
        return self.kv_cache

    def read_kv_blocks(self, block_ids: list[int], out: torch.Tensor | None = None) -> torch.Tensor:
        """A contiguous copy of the blocks' KV for every layer held, shaped
        (num_layers_held, 2, len(block_ids), block_size, num_kv_heads, head_dim); written
        into `out` (that shape and the cache's dtype, contiguous) when given."""
        self._check_block_ids(block_ids)
        kv_cache = self._held_kv()
        if out is not None and out.dtype != kv_cache.layers[kv_cache.layer_start].dtype:
            raise InvalidBlocksError(f"out has dtype {out.dtype}, the KV cache holds another")
        try:
            return kv_cache.read_blocks(block_ids, out=out)
        except ValueError as exc:  # out's shape
            raise InvalidBlocksError(str(exc)) from None

    def write_kv_blocks(
        self, block_ids: list[int], data: torch.Tensor, layer_start: int | None = None
    ) -> None:
        """Writes read_kv_blocks-shaped data; layer_start picks the first layer written
        (default: the first held), so a subset of layers can be written."""
        self._check_block_ids(block_ids)
        self._held_kv().write_blocks(block_ids, data, layer_start)

    def reserve_blocks(self, num_blocks: int) -> list[int]:
        """Blocks held outside any request (a migration destination's pre-allocation)."""
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 0:
            raise InvalidBlocksError(f"num_blocks must be an int >= 0, got {num_blocks!r}")
        if not self.block_manager.can_reserve(num_blocks):
            raise NoFreeBlocksError(
                f"cannot reserve {num_blocks} blocks: {self.block_manager.num_free_blocks} free"
            )
        return self.block_manager.reserve(num_blocks)

    def release_blocks(self, block_ids: list[int]) -> None:
        self.block_manager.release(list(block_ids))

    def suspend_request(self, request_id: str) -> None:
        """Stops scheduling a running request; it keeps its blocks (stop-and-copy)."""
        request = self._request(request_id)
        if request.status is not RequestStatus.RUNNING:
            raise InvalidRequestStateError(
                f"request {request_id!r} is {request.status.value}, not running"
            )
        request.set_status(RequestStatus.SUSPENDED)

    def resume_request(self, request_id: str) -> None:
        request = self._request(request_id)
        if request.status is not RequestStatus.SUSPENDED:
            raise InvalidRequestStateError(
                f"request {request_id!r} is {request.status.value}, not suspended"
            )
        request.set_status(RequestStatus.RUNNING)

    def remove_request(self, request_id: str) -> RequestState:
        """Hands the request over (migration committed): frees its blocks, emits nothing."""
        request = self._request(request_id)
        state = request.to_state()
        self.scheduler.finish(request, RequestStatus.MIGRATED)
        return state

    def import_request(self, state: RequestState, block_ids: list[int]) -> None:
        """Adopts a request whose KV for its first num_computed_tokens tokens is already in
        `block_ids` (reserved here, in block-table order). It continues exactly as it would
        have where it came from."""
        intake = self.intake
        intake.check_not_present(state.request_id)
        params = intake.check_params(state.params)
        intake.check_prompt(list(state.prompt_token_ids))
        intake.check_prompt(list(state.prompt_token_ids) + list(state.output_token_ids))
        if not 0 <= state.num_computed_tokens < state.num_tokens:
            raise InvalidRequestStateError(
                f"num_computed_tokens={state.num_computed_tokens} must be in [0, {state.num_tokens})"
            )
        last = state.output_token_ids[-1] if state.output_token_ids else None
        stops = set(params.stop_token_ids)
        if not params.ignore_eos:
            stops.update(self.eos_token_ids)
        if len(state.output_token_ids) >= params.max_tokens or last in stops:
            raise InvalidRequestStateError(f"request {state.request_id!r} has already finished")
        needed = self.block_manager.num_blocks_for(state.num_computed_tokens)
        if len(block_ids) < needed:
            raise InvalidBlocksError(
                f"{len(block_ids)} blocks cannot hold {state.num_computed_tokens} tokens of KV"
            )
        self.block_manager.check_reserved(list(block_ids))
        request = Request(
            state.request_id,
            list(state.prompt_token_ids),
            params,
            state.priority,
            state.arrival_time,
            intake.take_seq_no(),
            output_token_ids=list(state.output_token_ids),
            num_computed_tokens=state.num_computed_tokens,
        )
        if state.num_computed_tokens == 0:  # nothing computed: queue it like a new request
            self.block_manager.release(list(block_ids))
            self.scheduler.add_waiting(request)
            return
        self.block_manager.adopt(state.request_id, list(block_ids))
        self.scheduler.add_running(request)

    # ---- KunServe group (issue #17) -------------------------------------------------
    # A member that joins a group reads its running requests' KV of the layers other
    # members will hold (read_kv_layers) before it drops them; the group's leader adopts
    # every member's requests at their group block ids (import_request_at).

    def read_kv_layers(
        self,
        block_ids: list[int],
        layer_start: int,
        layer_end: int,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """read_kv_blocks for layers [layer_start, layer_end) only (all held here):
        (layer_end - layer_start, 2, len(block_ids), block_size, num_kv_heads, head_dim)."""
        self._check_block_ids(block_ids)
        kv_cache = self._held_kv()
        if not (
            isinstance(layer_start, int)
            and isinstance(layer_end, int)
            and kv_cache.layer_start <= layer_start < layer_end <= kv_cache.layer_end
        ):
            raise InvalidLayerRangeError(
                f"layers [{layer_start}, {layer_end}) are not all held; the pool holds "
                f"[{kv_cache.layer_start}, {kv_cache.layer_end})"
            )
        if out is not None and out.dtype != kv_cache.layers[layer_start].dtype:
            raise InvalidBlocksError(f"out has dtype {out.dtype}, the KV cache holds another")
        try:
            return kv_cache.read_blocks(block_ids, layer_start, layer_end, out=out)
        except ValueError as exc:  # out's shape
            raise InvalidBlocksError(str(exc)) from None

    def can_import_at(self, block_ids: list[int]) -> bool:
        """Whether import_request_at can take these block ids (distinct, all free)."""
        return self.block_manager.can_reserve_ids(list(block_ids))

    def import_request_at(self, state: RequestState, block_ids: list[int]) -> None:
        """import_request into exactly these free block ids (in block-table order), which
        hold the request's KV already: a group's leader adopts member r's request at
        offset_r + its old ids, a member leaving the group its requests at new local
        ids. A request with nothing computed queues as waiting and takes no blocks."""
        block_ids = list(block_ids)
        self._check_block_ids(block_ids)
        self.block_manager.reserve_ids(block_ids)  # raises naming blocks in use
        try:
            self.import_request(state, block_ids)
        except Exception:
            if self.block_manager.reserved_block_ids.issuperset(block_ids):  # not adopted
                self.block_manager.release(block_ids)
            raise
