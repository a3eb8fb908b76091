"""The KV block manager: the only owner of the free list.

Accounting only (no tensors): the KV pool in kv_cache.py is addressed by the block ids
handed out here. Every block is in exactly one of three places:

    free list  --allocate / may_append-->  a request's block table
    free list  --reserve-->                 reservations (held outside any request)
    free list  --reserve_ids-->             reservations, exactly the ids asked for
    reservations --adopt-->                 a request's block table (migration import)

and goes back to the free list when its reference count drops to 0. Checks come paired
with actions: can_allocate / allocate, can_append / may_append, can_reserve / reserve,
can_reserve_ids / reserve_ids.
"""

from __future__ import annotations

from collections import deque

from services.worker.engine.errors import (
    BlockIntegrityError,
    EngineStateError,
    InvalidBlocksError,
    NoFreeBlocksError,
)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(
                f"num_blocks and block_size must be > 0, got {num_blocks!r}, {block_size!r}"
            )
        self.block_size = block_size
        self.num_total_blocks = num_blocks
        # Allocation pops from the left; freed blocks go to the right (oldest-freed reused first).
        self.free_block_ids: deque[int] = deque(range(num_blocks))
        self.ref_counts: list[int] = [0] * num_blocks
        self.block_tables: dict[str, list[int]] = {}
        self.reserved_block_ids: set[int] = set()

    # ---- counts ---------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    @property
    def num_used_blocks(self) -> int:
        return self.num_total_blocks - len(self.free_block_ids)

    @property
    def num_reserved_blocks(self) -> int:
        return len(self.reserved_block_ids)

    def num_blocks_for(self, num_tokens: int) -> int:
        """Blocks that hold num_tokens tokens."""
        return -(-num_tokens // self.block_size)

    def block_ids(self, request_id: str) -> list[int]:
        """The request's block table (empty if it holds none). Do not mutate."""
        return self.block_tables.get(request_id, [])

    def num_new_blocks_needed(self, request_id: str, num_tokens: int) -> int:
        """Blocks to add to the request's table so it covers num_tokens token slots."""
        return max(0, self.num_blocks_for(num_tokens) - len(self.block_ids(request_id)))

    # ---- request block tables -------------------------------------------------------

    def can_allocate(self, num_tokens: int) -> bool:
        """Whether a request holding no blocks can get a table for num_tokens tokens."""
        return self.num_blocks_for(num_tokens) <= self.num_free_blocks

    def allocate(self, request_id: str, num_tokens: int) -> list[int]:
        """Creates the request's block table covering num_tokens; returns its block ids."""
        if request_id in self.block_tables:
            raise BlockIntegrityError(f"request {request_id!r} already has a block table")
        self.block_tables[request_id] = self._take(self.num_blocks_for(num_tokens))
        return self.block_tables[request_id]

    def can_append(self, request_id: str, num_tokens: int) -> bool:
        """Whether the request's table can grow to cover num_tokens tokens in total."""
        return self.num_new_blocks_needed(request_id, num_tokens) <= self.num_free_blocks

    def may_append(self, request_id: str, num_tokens: int) -> list[int]:
        """Grows the request's table to cover num_tokens tokens; returns the new block ids."""
        new_block_ids = self._take(self.num_new_blocks_needed(request_id, num_tokens))
        self.block_tables.setdefault(request_id, []).extend(new_block_ids)
        return new_block_ids

    def free(self, request_id: str) -> None:
        """Drops the request's table; its blocks go back when no other owner holds them."""
        for block_id in reversed(self.block_tables.pop(request_id, [])):
            self._decref(block_id)

    # ---- reservations (migration destinations) --------------------------------------

    def can_reserve(self, num_blocks: int) -> bool:
        return 0 <= num_blocks <= self.num_free_blocks

    def reserve(self, num_blocks: int) -> list[int]:
        """Takes num_blocks blocks off the free list, owned by no request."""
        if num_blocks < 0:
            raise InvalidBlocksError(f"num_blocks must be >= 0, got {num_blocks!r}")
        block_ids = self._take(num_blocks)
        self.reserved_block_ids.update(block_ids)
        return block_ids

    def release(self, block_ids: list[int]) -> None:
        """Gives reserved blocks back to the free list."""
        self.check_reserved(block_ids)
        for block_id in block_ids:
            self.reserved_block_ids.discard(block_id)
            self._decref(block_id)

    def adopt(self, request_id: str, block_ids: list[int]) -> None:
        """Turns reserved blocks into the (new) block table of request_id, in this order."""
        if request_id in self.block_tables:
            raise BlockIntegrityError(f"request {request_id!r} already has a block table")
        self.check_reserved(block_ids)
        self.reserved_block_ids.difference_update(block_ids)
        self.block_tables[request_id] = list(block_ids)

    # ---- given ids (KunServe: a group's leader adopts a member's blocks in place) ----

    def can_reserve_ids(self, block_ids: list[int]) -> bool:
        """Whether block_ids are distinct ids of this pool and all free."""
        total, ref_counts = self.num_total_blocks, self.ref_counts
        return len(set(block_ids)) == len(block_ids) and all(
            isinstance(b, int) and 0 <= b < total and ref_counts[b] == 0 for b in block_ids
        )

    def reserve_ids(self, block_ids: list[int]) -> None:
        """Takes exactly these free blocks off the free list, owned by no request (adopt
        turns them into a block table). The free list keeps its order otherwise."""
        if len(set(block_ids)) != len(block_ids):
            raise InvalidBlocksError(f"block ids repeat: {block_ids}")
        total = self.num_total_blocks
        outside = [b for b in block_ids if not (isinstance(b, int) and 0 <= b < total)]
        if outside:
            raise InvalidBlocksError(f"blocks {outside} are not in [0, {total})")
        in_use = [b for b in block_ids if self.ref_counts[b] != 0]
        if in_use:
            raise InvalidBlocksError(f"blocks {in_use} are in use")
        taken = set(block_ids)
        self.free_block_ids = deque(b for b in self.free_block_ids if b not in taken)
        for block_id in block_ids:
            self.ref_counts[block_id] = 1
        self.reserved_block_ids.update(block_ids)

    # ---- pool size changes (KunServe drop / restore) --------------------------------

    def reset(self, num_blocks: int) -> None:
        """Starts over with num_blocks free blocks, ids 0..num_blocks-1 (KunServe: the
        pool was laid out anew to join or leave a group). Only while no block is used."""
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks <= 0:
            raise ValueError(f"num_blocks must be an int > 0, got {num_blocks!r}")
        if self.num_used_blocks:
            raise EngineStateError(f"{self.num_used_blocks} blocks are in use; cannot reset")
        self.num_total_blocks = num_blocks
        self.free_block_ids = deque(range(num_blocks))
        self.ref_counts = [0] * num_blocks

    def grow(self, num_new_blocks: int) -> list[int]:
        """Adds blocks with the next ids to the free list; returns them."""
        new_ids = list(range(self.num_total_blocks, self.num_total_blocks + num_new_blocks))
        self.num_total_blocks += num_new_blocks
        self.ref_counts.extend([0] * num_new_blocks)
        self.free_block_ids.extend(new_ids)
        return new_ids

    def plan_shrink(self, num_blocks: int) -> dict[int, int]:
        """Moves needed to shrink the pool to num_blocks: {old id >= num_blocks: new id < num_blocks}.

        Only request-owned, unshared blocks can move (reserved ids are known to peers).
        """
        if num_blocks > self.num_total_blocks:
            raise ValueError(f"cannot shrink {self.num_total_blocks} blocks to {num_blocks}")
        if self.num_used_blocks > num_blocks:
            raise NoFreeBlocksError(
                f"{self.num_used_blocks} blocks are in use; cannot shrink the pool to {num_blocks}"
            )
        movers = [b for b in range(num_blocks, self.num_total_blocks) if self.ref_counts[b] > 0]
        for block_id in movers:
            if block_id in self.reserved_block_ids or self.ref_counts[block_id] != 1:
                raise NoFreeBlocksError(f"block {block_id} is reserved or shared; cannot move it")
        targets = [b for b in self.free_block_ids if b < num_blocks][: len(movers)]
        return dict(zip(movers, targets, strict=True))

    def shrink(self, num_blocks: int, moves: dict[int, int]) -> None:
        """Applies plan_shrink's moves (after the KV pool copied those blocks) and shrinks."""
        targets = set(moves.values())
        for table in self.block_tables.values():
            for i, block_id in enumerate(table):
                if block_id in moves:
                    table[i] = moves[block_id]
        for old, new in moves.items():
            self.ref_counts[new], self.ref_counts[old] = self.ref_counts[old], 0
        self.free_block_ids = deque(
            b for b in self.free_block_ids if b < num_blocks and b not in targets
        )
        del self.ref_counts[num_blocks:]
        self.num_total_blocks = num_blocks
        self.check_integrity()

    # ---- integrity ------------------------------------------------------------------

    def check_integrity(self) -> None:
        """Raises BlockIntegrityError unless free + used == total and every reference
        count equals the block's number of owners (block tables, reservations)."""
        free = set(self.free_block_ids)
        if len(free) != len(self.free_block_ids):
            raise BlockIntegrityError("the free list holds a block twice")
        owners = [0] * self.num_total_blocks
        for request_id, table in self.block_tables.items():
            if len(set(table)) != len(table):
                raise BlockIntegrityError(f"request {request_id!r} holds a block twice: {table}")
            for block_id in table:
                owners[block_id] += 1
        for block_id in self.reserved_block_ids:
            owners[block_id] += 1
        num_used = 0
        for block_id in range(self.num_total_blocks):
            ref_count = self.ref_counts[block_id]
            if block_id in free:
                if ref_count != 0 or owners[block_id] != 0:
                    raise BlockIntegrityError(f"free block {block_id} has ref_count {ref_count}")
                continue
            num_used += 1
            if ref_count == 0 or ref_count != owners[block_id]:
                raise BlockIntegrityError(
                    f"block {block_id}: ref_count {ref_count}, {owners[block_id]} owners"
                )
        if len(free) + num_used != self.num_total_blocks:
            raise BlockIntegrityError(
                f"free ({len(free)}) + used ({num_used}) != total ({self.num_total_blocks})"
            )

    # ---- internals ------------------------------------------------------------------

    def _take(self, num_blocks: int) -> list[int]:
        if num_blocks > len(self.free_block_ids):
            raise NoFreeBlocksError(
                f"need {num_blocks} free blocks, have {len(self.free_block_ids)}"
            )
        block_ids = [self.free_block_ids.popleft() for _ in range(num_blocks)]
        for block_id in block_ids:
            self.ref_counts[block_id] = 1
        return block_ids

    def _decref(self, block_id: int) -> None:
        self.ref_counts[block_id] -= 1
        if self.ref_counts[block_id] == 0:
            self.free_block_ids.append(block_id)

    def check_reserved(self, block_ids: list[int]) -> None:
        """Raises InvalidBlocksError unless block_ids are distinct and all reserved."""
        if len(set(block_ids)) != len(block_ids):
            raise InvalidBlocksError(f"block ids repeat: {block_ids}")
        not_reserved = [b for b in block_ids if b not in self.reserved_block_ids]
        if not_reserved:
            raise InvalidBlocksError(f"blocks {not_reserved} are not reserved")
