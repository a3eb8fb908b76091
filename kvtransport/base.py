"""The data-plane interface: what services see of kvtransport.

A transport is bound to the asyncio loop that started it. Peers know each other by
`address` (opaque bytes, exchanged over the gRPC control plane). A transfer is a list of
CPU tensors moved under a string id that the receiver names in `recv`; ids must be
unique per receiver for the life of the transport (use a new id for a retry).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from kvtransport.handles import SendHandle
from kvtransport.traffic import TrafficClass


@dataclass(frozen=True)
class ReceivedTransfer:
    """A completed receive."""

    transfer_id: str
    tensors: list[torch.Tensor]
    sender_address: bytes
    traffic_class: TrafficClass
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TransportStats:
    """Counters for monitoring, and for tests that a cancel left nothing behind."""

    num_pending_requests: int  # wire operations (sends, posted receives) not yet settled
    num_orphaned_requests: int  # sends a closed UCX link could not withdraw (peer gone)
    num_active_sends: int  # send handles not yet finished
    num_incoming: int  # transfers announced or being received
    num_remembered: int  # ended transfer ids kept for tombstone_ttl_s (late messages)
    num_bytes_sent: int
    num_bytes_received: int
    num_pool_allocations: int
    num_pool_reuses: int
    num_pool_bytes: int
    # Bytes of finished sends per traffic class (value "activation" / "kv").
    num_bytes_sent_by_class: Mapping[str, int] = field(default_factory=dict)


class Transport(ABC):
    """Moves tensors between workers; see docs/kvtransport.md for the protocol."""

    @property
    @abstractmethod
    def address(self) -> bytes:
        """This transport's identity; hand it to peers over the control plane."""

    @abstractmethod
    async def start(self) -> None:
        """Open the wire and start accepting transfers."""

    @abstractmethod
    async def send(
        self,
        peer_address: bytes,
        transfer_id: str,
        tensors: torch.Tensor | Sequence[torch.Tensor],
        traffic_class: TrafficClass = TrafficClass.KV,
        metadata: Mapping[str, str] | None = None,
    ) -> SendHandle:
        """Queue a transfer and return at once; await `handle.wait()` for completion.

        Tensors are sent from their own memory (non-contiguous ones are copied first):
        do not modify them until the handle finishes. `metadata` (e.g. W3C trace
        context) travels in the header and comes back in `ReceivedTransfer.metadata`.
        """

    @abstractmethod
    async def recv_transfer(
        self,
        transfer_id: str,
        into: Sequence[torch.Tensor] | None = None,
        timeout: float | None = None,
    ) -> ReceivedTransfer:
        """Wait for the transfer `transfer_id` from any peer, with its metadata.

        `into`: tensors to receive straight into (contiguous, CPU, one per sent tensor,
        equal byte sizes; dtype and shape are the caller's). Without it, tensors are
        views of a pooled buffer; pass them to `release` when done to recycle it.
        `timeout` defaults to `recv_timeout_s`; there is no infinite wait. On any error
        nothing will write into `into` any more, but its contents are unspecified.
        Raises TransferTimeout, TransferCancelled, PeerUnreachable or TransferMismatch.
        """

    async def recv(
        self,
        transfer_id: str,
        into: Sequence[torch.Tensor] | None = None,
        timeout: float | None = None,
    ) -> list[torch.Tensor]:
        """`recv_transfer` returning only the tensors."""
        received = await self.recv_transfer(transfer_id, into=into, timeout=timeout)
        return received.tensors

    @abstractmethod
    async def cancel_recv(self, transfer_id: str) -> bool:
        """Abandon a receive (its `recv` raises TransferCancelled) and tell the sender.

        Returns once nothing writes into its buffers any more; False if no such receive.
        """

    @abstractmethod
    async def drop_peer(self, peer_address: bytes) -> None:
        """The control plane declared the peer dead: fail everything to and from it now."""

    @abstractmethod
    def release(self, tensors: Sequence[torch.Tensor]) -> bool:
        """Recycle the pooled buffer behind tensors from a receive without `into`."""

    @abstractmethod
    def stats(self) -> TransportStats:
        """Current counters."""

    @abstractmethod
    async def close(self) -> None:
        """Fail everything in flight, release the wire. Idempotent."""

    async def __aenter__(self) -> Transport:
        await self.start()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()
