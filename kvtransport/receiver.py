"""Receiver: `recv` and everything that can happen to a transfer on the receiving side.

Life of one receive (numbers match the comments below):
    1. claim the record for the transfer id (or find the sender's header already here);
    2. wait for the header, bounded by the deadline;
    3. choose destinations: the caller's `into` tensors, or a pooled buffer;
    4. inline transfers: copy the payload from the header; others: post every chunk's
       buffer on the fabric and wait for all of them, the deadline, or an interrupt;
    5. any failure ends in _abandon, which guarantees nothing writes into the buffers
       afterwards and tells the sender (Reject) when this side gave up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from functools import partial

import numpy as np
import torch

from kvtransport.base import ReceivedTransfer
from kvtransport.buffers import BufferPool
from kvtransport.chunks import ChunkRef
from kvtransport.config import TransportConfig
from kvtransport.destinations import copy_inline, destinations
from kvtransport.errors import (
    PeerUnreachable,
    TransferCancelled,
    TransferTimeout,
    TransportError,
)
from kvtransport.fabric import Fabric
from kvtransport.incoming import ENDED_STATUSES, IncomingStatus, IncomingTable, IncomingTransfer
from kvtransport.tensors import check_receivable
from kvtransport.traffic import ActivationFlow, TrafficClass
from kvtransport.wire import (
    CancelTransfer,
    RechunkTransfer,
    RejectTransfer,
    TransferHeader,
    encode,
)

log = logging.getLogger(__name__)

# Receive buffers kept posted per transfer. The sender has at most kv_window chunks in
# flight, so a few more than that keeps every arriving chunk matched on arrival.
POSTED_CHUNKS_AHEAD = 8
POSTED_CHUNKS_AHEAD_WITH_ACTIVATIONS = 1

# send_reject(sender_address, frame): deliver a control frame to a peer, best effort.
SendReject = Callable[[bytes, bytes], None]
# report_peer_lost(address, error): tell the whole transport a peer is gone.
ReportPeerLost = Callable[[bytes, PeerUnreachable], None]


class _SenderCancelled(TransferCancelled):
    def __init__(self, message: CancelTransfer) -> None:
        super().__init__(
            f"transfer {message.transfer_id!r} cancelled by its sender ({message.reason})"
        )
        self.num_chunks_issued = message.num_chunks_issued


class Receiver:
    def __init__(
        self,
        fabric: Fabric,
        pool: BufferPool,
        config: TransportConfig,
        activations: ActivationFlow,
        send_reject: SendReject,
        report_peer_lost: ReportPeerLost,
    ) -> None:
        self._fabric = fabric
        self._pool = pool
        self._config = config
        self._activations = activations
        self._send_reject = send_reject
        self._report_peer_lost = report_peer_lost
        self._table = IncomingTable()
        # Senders known dead. Nothing from them is ever received again: with UCX, matching
        # a dead sender's chunk after its first failure can crash the process.
        self._lost_senders: set[bytes] = set()
        self._tasks: set[asyncio.Task] = set()
        self.num_bytes_received = 0

    @property
    def num_incoming(self) -> int:
        return sum(1 for entry in self._table if entry.status not in ENDED_STATUSES)

    @property
    def num_remembered(self) -> int:
        return sum(1 for entry in self._table if entry.status in ENDED_STATUSES)

    async def recv(
        self,
        transfer_id: str,
        into: Sequence[torch.Tensor] | None,
        timeout: float | None,
    ) -> ReceivedTransfer:
        if not isinstance(transfer_id, str) or not transfer_id:
            raise ValueError(f"transfer_id must be a non-empty string, got {transfer_id!r}")
        timeout = self._config.recv_timeout_s if timeout is None else timeout
        if not isinstance(timeout, int | float) or not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        if into is not None:
            into = [into] if isinstance(into, torch.Tensor) else list(into)
            for index, tensor in enumerate(into):
                check_receivable(tensor, index)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        entry = self._claim(transfer_id)  # 1
        pooled: torch.Tensor | None = None
        try:
            await self._wait_until(lambda: entry.header is not None, entry, deadline, timeout)  # 2
            header = entry.header
            assert header is not None
            tensors, views, pooled = destinations(header, into, self._pool)  # 3
            if header.is_inline:  # 4
                self._fill_inline(entry, views)
            else:
                self._start_chunks(entry, views)
                try:
                    await self._wait_until(
                        lambda: len(entry.completed_seqs) == entry.plan.num_chunks,
                        entry,
                        deadline,
                        timeout,
                    )
                except PeerUnreachable as exc:
                    self._report_peer_lost(header.sender, exc)
                    raise
                entry.is_posted = False
                if entry.num_stale_posts:
                    await self._fabric.abort_chunks(header.key)  # withdraws the stale ones
                else:
                    self._fabric.finish_chunks(header.key)
            self._table.remove(entry)
            return ReceivedTransfer(
                transfer_id, tensors, header.sender, header.traffic_class, dict(header.metadata)
            )
        except BaseException as exc:
            error = await self._abandon(entry, exc)  # 5
            if pooled is not None:
                self._pool.release(pooled)
            if error is exc or isinstance(exc, asyncio.CancelledError):
                raise
            raise error from exc
        finally:
            if not entry.settled.done():
                entry.settled.set_result(None)

    async def cancel_recv(self, transfer_id: str) -> bool:
        entry = self._table.get(transfer_id)
        if entry is None or entry.status in ENDED_STATUSES:
            return False
        if not entry.is_claimed:  # announced, nobody receiving: refuse it
            self._reject(entry, "cancelled by the receiver before any recv()")
            return True
        entry.interrupt_with(
            TransferCancelled(f"receive of {transfer_id!r} cancelled by the receiver")
        )
        await asyncio.shield(entry.settled)
        return True

    # -- control messages -------------------------------------------------------------

    def on_header(self, header: TransferHeader, payload: memoryview) -> None:
        if header.traffic_class is TrafficClass.ACTIVATION:
            self._activations.note_activation()
        entry = self._table.get(header.transfer_id)
        if self._table.is_key_known(header.key):
            log.warning("ignoring header of %r: key already in use", header.transfer_id)
            return
        if entry is None:
            entry = self._new_entry(header.transfer_id, IncomingStatus.ANNOUNCED)
            entry.header = header
            entry.inline_payload = bytes(payload) if header.is_inline else None
            self._table.add(entry)
        elif entry.status is IncomingStatus.WAITING:
            self._table.attach_header(entry, header)
            entry.inline_payload = bytes(payload) if header.is_inline else None
            entry.set_status(IncomingStatus.RECEIVING)
            entry.wake()
        elif entry.status is IncomingStatus.REJECTED and entry.header is None:
            self._table.attach_header(entry, header)  # this side gave up before it came
            self._reject(entry, "the receiver gave up before the transfer arrived")
        else:
            duplicate = self._new_entry(header.transfer_id, IncomingStatus.REJECTED)
            duplicate.header = header
            self._table.add(duplicate, index_id=False)
            self._reject(duplicate, f"duplicate transfer id {header.transfer_id!r}")
            return
        if header.sender in self._lost_senders:  # a header that was already on its way
            self.on_peer_lost(header.sender, PeerUnreachable("the sender was lost"))

    def on_cancel(self, message: CancelTransfer) -> None:
        entry = self._table.by_key(message.key)
        if entry is None:
            return
        if entry.status is IncomingStatus.ANNOUNCED:
            entry.set_status(IncomingStatus.CANCELLED)
            self._remember(entry)
            self._drain(entry, message.num_chunks_issued)
        elif entry.status is IncomingStatus.RECEIVING:
            entry.interrupt_with(_SenderCancelled(message))
        elif entry.status is IncomingStatus.REJECTED:
            self._drain(entry, message.num_chunks_issued)

    def on_rechunk(self, message: RechunkTransfer) -> None:
        """The sender cut the chunks after `num_chunks_kept` anew (chunks.py)."""
        entry = self._table.by_key(message.key)
        if entry is None or entry.header is None:
            return
        plan = entry.plan
        if not plan.can_rechunk(message.num_chunks_kept, message.chunk_bytes):
            entry.interrupt_with(TransportError(f"invalid rechunk of {entry.transfer_id!r}"))
            return
        # Receives already posted after the kept chunks wait for seqs that will never
        # come: they stop counting, and the transfer's receives close at its end.
        for position in range(message.num_chunks_kept + 1, entry.num_posted + 1):
            del entry.chunk_futures[plan.chunk(position).seq]
            entry.num_stale_posts += 1
        entry.num_posted = min(entry.num_posted, message.num_chunks_kept)
        plan.rechunk(message.num_chunks_kept, message.chunk_bytes)
        self._post_more(entry)

    def on_peer_lost(self, peer_address: bytes, error: PeerUnreachable) -> None:
        self._lost_senders.add(peer_address)
        for entry in self._table:
            if entry.header is None or entry.header.sender != peer_address:
                continue
            if entry.status is IncomingStatus.RECEIVING:
                entry.interrupt_with(error)
            elif entry.status is IncomingStatus.ANNOUNCED:
                entry.set_status(IncomingStatus.FAILED)
                self._remember(entry)
                self._drain(entry, 0)  # frees anything a wire had staged for it

    def sweep(self, now: float) -> None:
        """Reject transfers nobody claimed in time; forget old tombstones."""
        for entry in self._table:
            if entry.forget_at is not None and now >= entry.forget_at:
                self._table.remove(entry)
            elif (
                entry.status is IncomingStatus.ANNOUNCED
                and now - entry.created_at >= self._config.unclaimed_timeout_s
            ):
                self._reject(entry, f"not claimed within {self._config.unclaimed_timeout_s}s")

    async def close(self) -> None:
        for entry in self._table:
            if entry.status in (IncomingStatus.WAITING, IncomingStatus.RECEIVING):
                entry.interrupt_with(TransportError("transport closed"))
        for entry in self._table:
            if entry.is_claimed:
                await asyncio.shield(entry.settled)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- internals --------------------------------------------------------------------

    def _new_entry(self, transfer_id: str, status: IncomingStatus) -> IncomingTransfer:
        now = asyncio.get_running_loop().time()
        return IncomingTransfer(transfer_id, status, created_at=now)

    def _claim(self, transfer_id: str) -> IncomingTransfer:
        entry = self._table.get(transfer_id)
        if entry is None:
            entry = self._new_entry(transfer_id, IncomingStatus.WAITING)
            self._table.add(entry)
        elif entry.status is IncomingStatus.ANNOUNCED:
            entry.set_status(IncomingStatus.RECEIVING)
        elif entry.status is IncomingStatus.CANCELLED:
            raise TransferCancelled(f"transfer {transfer_id!r} was cancelled by its sender")
        elif entry.status is IncomingStatus.FAILED:
            raise PeerUnreachable(f"the sender of {transfer_id!r} was lost")
        elif entry.status is IncomingStatus.REJECTED:
            raise TransferCancelled(f"transfer {transfer_id!r} was abandoned by this receiver")
        else:
            raise TransportError(f"transfer {transfer_id!r} is already being received")
        entry.is_claimed = True
        return entry

    async def _wait_until(
        self, is_ready, entry: IncomingTransfer, deadline: float, timeout: float
    ) -> None:
        """Wait for is_ready(); raise the entry's interrupt, or TransferTimeout at deadline.

        Whoever changes the entry resolves `entry.waiter` directly (wake/interrupt_with),
        so a wake-up costs one event-loop turn: activations depend on it.
        """
        loop = asyncio.get_running_loop()
        while True:
            if entry.error is not None:
                raise entry.error
            if is_ready():
                return
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TransferTimeout(
                    f"transfer {entry.transfer_id!r} not received within {timeout}s"
                )
            entry.waiter = loop.create_future()
            timer = loop.call_later(remaining, _expire, entry.waiter)
            try:
                await entry.waiter
            except TimeoutError:
                pass  # the loop re-checks and raises TransferTimeout
            finally:
                timer.cancel()
                entry.waiter = None

    def _fill_inline(self, entry: IncomingTransfer, views: list[np.ndarray]) -> None:
        num_bytes = copy_inline(entry.inline_payload or b"", views)
        entry.num_bytes_received += num_bytes
        self.num_bytes_received += num_bytes

    def _start_chunks(self, entry: IncomingTransfer, views: list[np.ndarray]) -> None:
        entry.views = views
        entry.is_posted = True
        self._post_more(entry)

    def _post_more(self, entry: IncomingTransfer) -> None:
        """Keep POSTED_CHUNKS_AHEAD receive buffers posted (chunks beyond wait on the wire).

        One buffer per event-loop turn: a chunk that is already waiting is copied in
        right when its buffer is posted (UCX does the rendezvous read inside the call),
        and an activation arriving meanwhile should wait for one chunk, not eight.
        """
        if not entry.is_posted or entry.error is not None:
            return
        assert entry.header is not None
        num_in_flight = len(entry.chunk_futures) - len(entry.completed_seqs)
        limit = (
            POSTED_CHUNKS_AHEAD_WITH_ACTIVATIONS
            if self._activations.is_flowing
            else POSTED_CHUNKS_AHEAD
        )
        if entry.num_posted >= entry.plan.num_chunks or num_in_flight >= limit:
            return
        chunk = entry.plan.chunk(entry.num_posted + 1)
        view = entry.views[chunk.tensor_index][chunk.offset : chunk.offset + chunk.nbytes]
        entry.num_posted += 1
        (future,) = self._fabric.post_chunks(entry.header.key, [(chunk.seq, view)])
        entry.chunk_futures[chunk.seq] = future
        future.add_done_callback(partial(self._on_chunk, entry, chunk))
        asyncio.get_running_loop().call_soon(self._post_more, entry)

    def _on_chunk(self, entry: IncomingTransfer, chunk: ChunkRef, future: asyncio.Future) -> None:
        if future.cancelled() or entry.chunk_futures.get(chunk.seq) is not future:
            return  # withdrawn, or posted for a seq a rechunk dropped
        error = future.exception()
        if error is not None:
            entry.interrupt_with(error)
            return
        entry.completed_seqs.add(chunk.seq)
        entry.num_bytes_received += chunk.nbytes
        self.num_bytes_received += chunk.nbytes
        self._post_more(entry)
        entry.wake()

    async def _abandon(self, entry: IncomingTransfer, exc: BaseException) -> BaseException:
        """Make the buffers safe again and record why; returns the error to raise."""
        key = entry.header.key if entry.header is not None else None
        was_posted, entry.is_posted = entry.is_posted, False  # post nothing more
        if isinstance(exc, _SenderCancelled):
            if was_posted:
                # The sender is alive and says which chunks it issued: let the posted
                # ones among them land, withdraw the rest...
                issued_seqs = {chunk.seq for chunk in _issued(entry, exc.num_chunks_issued)}
                issued = [f for s, f in entry.chunk_futures.items() if s in issued_seqs]
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        asyncio.gather(*issued, return_exceptions=True),
                        self._config.cancel_grace_s,
                    )
                await self._fabric.abort_chunks(key)
            # ...and consume the issued ones no buffer was posted for.
            self._drain(entry, exc.num_chunks_issued)
            entry.set_status(IncomingStatus.CANCELLED)
            self._remember(entry)
            return exc
        if was_posted:
            await self._fabric.abort_chunks(key)
        if isinstance(exc, PeerUnreachable):
            entry.set_status(IncomingStatus.FAILED)
            self._remember(entry)
            return exc
        # This side gave up (timeout, cancel_recv, mismatch, caller cancelled, closing).
        reason = "receiver task cancelled" if isinstance(exc, asyncio.CancelledError) else str(exc)
        self._reject(entry, reason)
        if isinstance(exc, TransportError | asyncio.CancelledError):
            return exc
        return TransportError(f"receive of {entry.transfer_id!r} failed: {exc!r}")

    def _reject(self, entry: IncomingTransfer, reason: str) -> None:
        entry.set_status(IncomingStatus.REJECTED)
        self._remember(entry)
        if entry.header is not None:
            header = entry.header
            frame = encode(RejectTransfer(header.transfer_id, header.key, reason))
            self._send_reject(header.sender, frame)

    def _remember(self, entry: IncomingTransfer) -> None:
        now = asyncio.get_running_loop().time()
        entry.forget_at = now + self._config.tombstone_ttl_s

    def _drain(self, entry: IncomingTransfer, num_chunks_issued: int) -> None:
        """Consume chunks the sender issued that no buffer will ever be posted for."""
        header = entry.header
        if header is None or header.is_inline or header.sender in self._lost_senders:
            return
        issued = _issued(entry, num_chunks_issued)
        sizes = [(c.seq, c.nbytes) for c in issued if c.seq not in entry.completed_seqs]
        task = asyncio.get_running_loop().create_task(
            self._fabric.drain_chunks(header.key, sizes, self._config.cancel_grace_s)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_retrieve)


def _issued(entry: IncomingTransfer, num_chunks_issued: int) -> list[ChunkRef]:
    """The chunks a sender that issued `num_chunks_issued` of them sent, in order."""
    plan = entry.plan
    return [
        plan.chunk(position) for position in range(1, min(num_chunks_issued, plan.num_chunks) + 1)
    ]


def _expire(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.debug("background receive step failed: %s", future.exception())
