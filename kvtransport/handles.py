"""SendHandle: the sender's view of one transfer, and its status machine.

QUEUED ──> SENDING ──> DONE
  │  ╲        │ ▲
  │   ╲       ▼ │ resume()
  │    ╲──> PAUSED
  │           │
  └───────────┴──> CANCELLED | FAILED     (from any non-final state)
"""

from __future__ import annotations

import asyncio
from enum import StrEnum
from typing import Protocol

from kvtransport.errors import TransportError
from kvtransport.traffic import TrafficClass


class TransferStatus(StrEnum):
    QUEUED = "queued"  # nothing issued yet
    SENDING = "sending"  # header issued; chunks flowing when the scheduler allows
    PAUSED = "paused"  # no new chunk starts until resume()
    DONE = "done"  # every byte taken by the peer
    CANCELLED = "cancelled"  # stopped by cancel() or by the receiver
    FAILED = "failed"  # timeout or unreachable peer


ALLOWED_TRANSITIONS: dict[TransferStatus, frozenset[TransferStatus]] = {
    TransferStatus.QUEUED: frozenset(
        {
            TransferStatus.SENDING,
            TransferStatus.PAUSED,
            TransferStatus.CANCELLED,
            TransferStatus.FAILED,
        }
    ),
    TransferStatus.SENDING: frozenset(
        {
            TransferStatus.PAUSED,
            TransferStatus.DONE,
            TransferStatus.CANCELLED,
            TransferStatus.FAILED,
        }
    ),
    TransferStatus.PAUSED: frozenset(
        {
            TransferStatus.QUEUED,
            TransferStatus.SENDING,
            TransferStatus.DONE,  # its last chunk, issued before pause(), landed
            TransferStatus.CANCELLED,
            TransferStatus.FAILED,
        }
    ),
    TransferStatus.DONE: frozenset(),
    TransferStatus.CANCELLED: frozenset(),
    TransferStatus.FAILED: frozenset(),
}

FINAL_STATUSES = frozenset({TransferStatus.DONE, TransferStatus.CANCELLED, TransferStatus.FAILED})


class SendController(Protocol):
    """What a handle asks of the scheduler that owns it (priority.PeerScheduler)."""

    def pause(self, handle: SendHandle) -> asyncio.Future: ...

    def resume(self, handle: SendHandle) -> None: ...

    async def cancel(self, handle: SendHandle) -> bool: ...


class SendHandle:
    """Returned by `Transport.send`; pause, resume, cancel, or wait for the transfer."""

    def __init__(
        self,
        transfer_id: str,
        traffic_class: TrafficClass,
        num_bytes_total: int,
        controller: SendController,
    ) -> None:
        self.transfer_id = transfer_id
        self.traffic_class = traffic_class
        self.num_bytes_total = num_bytes_total
        self.num_bytes_sent = 0
        self.num_chunks_sent = 0  # chunk messages the peer took (the header is not one)
        self.status = TransferStatus.QUEUED
        self.error: TransportError | None = None
        self._controller = controller
        self._finished = asyncio.get_running_loop().create_future()

    @property
    def is_finished(self) -> bool:
        return self.status in FINAL_STATUSES

    def pause(self) -> asyncio.Future:
        """Stop starting chunks, now. Await the result to also wait until none of this
        transfer's chunks is in flight (after that, no byte of it moves until resume())."""
        return self._controller.pause(self)

    def resume(self) -> None:
        """Let a paused transfer continue where it stopped."""
        self._controller.resume(self)

    async def cancel(self) -> bool:
        """Stop the transfer and tell the receiver; returns once no chunk is in flight.

        False if it had already finished (every chunk was issued before the call).
        """
        return await self._controller.cancel(self)

    async def wait(self) -> None:
        """Return when DONE; raise the error (TransferCancelled, ...) otherwise."""
        await asyncio.shield(self._finished)

    def set_status(self, status: TransferStatus) -> None:
        """Scheduler only: move along ALLOWED_TRANSITIONS."""
        if status is self.status:
            return
        assert status in ALLOWED_TRANSITIONS[self.status], f"{self.status} -> {status}"
        self.status = status

    def finish(self, status: TransferStatus, error: TransportError | None = None) -> None:
        """Scheduler only: enter a final status and wake `wait()`."""
        assert status in FINAL_STATUSES and (error is None) == (status is TransferStatus.DONE)
        self.set_status(status)
        self.error = error
        if error is None:
            self._finished.set_result(None)
        else:
            self._finished.set_exception(error)
            self._finished.exception()  # retrieved: nobody has to wait() on a failure

    def __repr__(self) -> str:
        return (
            f"SendHandle({self.transfer_id!r}, {self.traffic_class.value}, {self.status.value}, "
            f"{self.num_bytes_sent}/{self.num_bytes_total} B)"
        )
