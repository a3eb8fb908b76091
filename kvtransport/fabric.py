"""The contract between the transport logic (core.py) and a wire (ucx.py, tcp.py).

A fabric moves two kinds of message and nothing else:

- control frames (wire.encode) to a peer's mailbox, delivered in order per sender to
  `FabricEvents.on_control`;
- chunks named (key, seq), which the receiver must have posted a buffer for: a chunk
  whose buffer is not posted yet waits (UCX: in its unexpected queue; TCP: staged in a
  pooled buffer) until `post_chunks`, `drain_chunks` or expiry.

Everything here runs on the transport's event loop; futures settle there.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from kvtransport.errors import TransportError
from kvtransport.traffic import TrafficClass
from kvtransport.wire import ControlMessage


@dataclass(frozen=True)
class ControlOut:
    """A control frame for the peer's mailbox."""

    frame: bytes
    traffic_class: TrafficClass
    num_payload_bytes: int  # inline tensor bytes inside the frame (counted as sent)


@dataclass(frozen=True)
class ChunkOut:
    """Chunk `seq` of transfer `key`: a view of the source tensor's memory."""

    key: int
    seq: int
    view: np.ndarray
    traffic_class: TrafficClass

    @property
    def num_payload_bytes(self) -> int:
        return self.view.nbytes


OutMessage = ControlOut | ChunkOut


class FabricEvents(Protocol):
    """What a fabric reports to the transport that owns it."""

    def on_control(self, message: ControlMessage, payload: memoryview) -> None:
        """A control message arrived; `payload` is only valid during the call."""

    def on_peer_lost(self, peer_address: bytes, error: TransportError) -> None:
        """The wire noticed a peer die (connection reset, I/O error)."""


class PeerLink(ABC):
    """The sending side of a connection to one peer."""

    @abstractmethod
    def start_send(self, message: OutMessage) -> asyncio.Future[None]:
        """Issue a message now; the future settles when the peer has taken its bytes.

        Fails with PeerUnreachable if the link breaks; never hangs past `abort()`.
        """

    @abstractmethod
    async def abort(self) -> None:
        """Withdraw everything in flight (futures fail) and close the link."""


class Fabric(ABC):
    """One transport's wire: its address, its links, and its posted receives."""

    @property
    @abstractmethod
    def address(self) -> bytes: ...

    @abstractmethod
    async def start(self, events: FabricEvents) -> None: ...

    @abstractmethod
    async def connect(self, peer_address: bytes) -> PeerLink:
        """A new link to the peer (raises PeerUnreachable or ValueError for a bad address)."""

    @abstractmethod
    def post_chunks(
        self, key: int, targets: Sequence[tuple[int, np.ndarray]]
    ) -> list[asyncio.Future[None]]:
        """Post receive buffers for chunks (seq, writable uint8 view) of transfer `key`."""

    @abstractmethod
    def finish_chunks(self, key: int) -> None:
        """Every chunk posted for `key` completed; forget the key."""

    @abstractmethod
    async def abort_chunks(self, key: int) -> None:
        """Withdraw the posted receives of `key`; once this returns none writes any more."""

    @abstractmethod
    async def drain_chunks(
        self, key: int, sizes: Sequence[tuple[int, int]], timeout: float
    ) -> None:
        """Consume and drop chunks (seq, nbytes) of `key` that a cancelled sender had issued."""

    @abstractmethod
    def num_pending(self) -> int:
        """Wire operations not yet settled (sends and posted receives)."""

    def num_orphaned(self) -> int:
        """Sends the wire could not withdraw from a closed link (see UcxWorker)."""
        return 0

    @abstractmethod
    async def close(self) -> None: ...
