"""Receive-side records: one IncomingTransfer per transfer id this transport knows of.

recv() first:   WAITING ──header──> RECEIVING ──> (removed: done)
header first:   ANNOUNCED ──recv()──> RECEIVING
endings kept for tombstone_ttl_s so late messages and late recv() calls are answered:
    CANCELLED  the sender cancelled (a later recv() raises TransferCancelled)
    REJECTED   this side gave up (timeout, cancel_recv, mismatch, unclaimed); the
               record waits for the sender's Cancel to drain chunks it had issued
    FAILED     the sender was lost (a later recv() raises PeerUnreachable)
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum

from kvtransport.chunks import ChunkPlan
from kvtransport.errors import TransportError
from kvtransport.wire import TransferHeader


class IncomingStatus(StrEnum):
    WAITING = "waiting"
    ANNOUNCED = "announced"
    RECEIVING = "receiving"
    CANCELLED = "cancelled"
    REJECTED = "rejected"
    FAILED = "failed"


ALLOWED_TRANSITIONS: dict[IncomingStatus, frozenset[IncomingStatus]] = {
    IncomingStatus.WAITING: frozenset(
        {IncomingStatus.RECEIVING, IncomingStatus.REJECTED, IncomingStatus.FAILED}
    ),
    IncomingStatus.ANNOUNCED: frozenset(
        {
            IncomingStatus.RECEIVING,
            IncomingStatus.CANCELLED,
            IncomingStatus.REJECTED,
            IncomingStatus.FAILED,
        }
    ),
    IncomingStatus.RECEIVING: frozenset(
        {IncomingStatus.CANCELLED, IncomingStatus.REJECTED, IncomingStatus.FAILED}
    ),
    IncomingStatus.CANCELLED: frozenset(),
    IncomingStatus.REJECTED: frozenset(),
    IncomingStatus.FAILED: frozenset(),
}

ENDED_STATUSES = frozenset(
    {IncomingStatus.CANCELLED, IncomingStatus.REJECTED, IncomingStatus.FAILED}
)


@dataclass(eq=False)
class IncomingTransfer:
    transfer_id: str
    status: IncomingStatus
    created_at: float
    header: TransferHeader | None = None
    inline_payload: bytes | None = None
    is_claimed: bool = False  # a recv() owns this record
    is_posted: bool = False  # its chunk buffers are being posted on the fabric
    views: list = field(default_factory=list)  # destination bytes per tensor (uint8 views)
    num_posted: int = 0  # chunks at positions 1 .. num_posted have a receive posted
    num_stale_posts: int = 0  # receives for seqs a rechunk dropped: withdrawn at the end
    chunk_futures: dict[int, asyncio.Future] = field(default_factory=dict)  # by seq
    completed_seqs: set[int] = field(default_factory=set)
    num_bytes_received: int = 0
    forget_at: float | None = None  # ended records are dropped after this time
    error: TransportError | None = None  # why the recv() must stop (first reason wins)
    waiter: asyncio.Future | None = None  # what the owning recv() awaits right now
    settled: asyncio.Future = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    _plan: ChunkPlan | None = field(default=None, init=False, repr=False)

    @property
    def plan(self) -> ChunkPlan:
        """The header's chunks in the sender's issue order, its rechunks applied."""
        if self._plan is None:
            header = self.header
            assert header is not None, "no chunk plan before the header"
            self._plan = ChunkPlan.of(
                () if header.is_inline else header.tensors, header.chunk_bytes
            )
        return self._plan

    def set_status(self, status: IncomingStatus) -> None:
        if status is self.status:
            return
        assert status in ALLOWED_TRANSITIONS[self.status], f"{self.status} -> {status}"
        self.status = status

    def wake(self) -> None:
        """Something the recv() waits for happened: let it re-check (one loop turn)."""
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def interrupt_with(self, error: TransportError) -> None:
        """Make the recv() that owns this record raise `error` (first reason wins)."""
        if self.error is None:
            self.error = error
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(self.error)


class IncomingTable:
    """Records by transfer id, and by wire key once the header is known."""

    def __init__(self) -> None:
        self._by_id: dict[str, IncomingTransfer] = {}
        self._by_key: dict[int, IncomingTransfer] = {}

    def __len__(self) -> int:
        return len(self._by_id) + sum(1 for e in self._by_key.values() if not self._has_id(e))

    def __iter__(self) -> Iterator[IncomingTransfer]:
        yield from list(self._by_id.values())
        yield from [e for e in self._by_key.values() if not self._has_id(e)]

    def get(self, transfer_id: str) -> IncomingTransfer | None:
        return self._by_id.get(transfer_id)

    def by_key(self, key: int) -> IncomingTransfer | None:
        return self._by_key.get(key)

    def is_key_known(self, key: int) -> bool:
        return key in self._by_key

    def add(self, entry: IncomingTransfer, *, index_id: bool = True) -> None:
        """index_id=False: a record only reachable by key (a rejected duplicate)."""
        if index_id:
            assert entry.transfer_id not in self._by_id
            self._by_id[entry.transfer_id] = entry
        if entry.header is not None:
            self._by_key[entry.header.key] = entry

    def attach_header(self, entry: IncomingTransfer, header: TransferHeader) -> None:
        entry.header = header
        self._by_key[header.key] = entry

    def remove(self, entry: IncomingTransfer) -> None:
        if self._by_id.get(entry.transfer_id) is entry:
            del self._by_id[entry.transfer_id]
        if entry.header is not None and self._by_key.get(entry.header.key) is entry:
            del self._by_key[entry.header.key]

    def _has_id(self, entry: IncomingTransfer) -> bool:
        return self._by_id.get(entry.transfer_id) is entry
