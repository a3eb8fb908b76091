"""FabricTransport: the Transport API over any Fabric (the protocol lives here and in
sender.py / receiver.py; the wires in ucx.py and tcp.py only move bytes)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence

import torch

from kvtransport.base import ReceivedTransfer, Transport, TransportStats
from kvtransport.buffers import BufferPool
from kvtransport.config import TransportConfig
from kvtransport.errors import PeerUnreachable, TransportError
from kvtransport.fabric import Fabric
from kvtransport.handles import SendHandle
from kvtransport.receiver import Receiver
from kvtransport.sender import Sender
from kvtransport.traffic import ActivationFlow, TrafficClass
from kvtransport.wire import (
    CancelTransfer,
    ControlMessage,
    RechunkTransfer,
    RejectTransfer,
    TransferHeader,
)

log = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 1.0


class FabricTransport(Transport):
    def __init__(
        self,
        config: TransportConfig,
        fabric: Fabric,
        pool: BufferPool,
        activations: ActivationFlow | None = None,
    ) -> None:
        """`activations`: the flow the fabric reads too (UCX progress), if it does."""
        self.config = config
        self._fabric = fabric
        self._pool = pool
        self._activations = activations or ActivationFlow(config.activation_quiet_s)
        self._sender: Sender | None = None
        self._receiver: Receiver | None = None
        self._sweeper: asyncio.Task | None = None
        self._is_closed = False

    @property
    def address(self) -> bytes:
        return self._fabric.address

    async def start(self) -> None:
        if self._sender is not None:
            raise RuntimeError("transport already started")
        self._sender = Sender(self._fabric, self.config, self._activations)
        self._receiver = Receiver(
            self._fabric,
            self._pool,
            self.config,
            self._activations,
            self._sender.send_reject,
            self.on_peer_lost,
        )
        await self._fabric.start(self)
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    async def send(
        self,
        peer_address: bytes,
        transfer_id: str,
        tensors: torch.Tensor | Sequence[torch.Tensor],
        traffic_class: TrafficClass = TrafficClass.KV,
        metadata: Mapping[str, str] | None = None,
    ) -> SendHandle:
        return await self._started_sender().send(
            peer_address, transfer_id, tensors, traffic_class, metadata
        )

    async def recv_transfer(
        self,
        transfer_id: str,
        into: Sequence[torch.Tensor] | None = None,
        timeout: float | None = None,
    ) -> ReceivedTransfer:
        return await self._started_receiver().recv(transfer_id, into, timeout)

    async def cancel_recv(self, transfer_id: str) -> bool:
        return await self._started_receiver().cancel_recv(transfer_id)

    async def drop_peer(self, peer_address: bytes) -> None:
        self.on_peer_lost(peer_address, PeerUnreachable("peer declared dead by the control plane"))
        await asyncio.sleep(0)  # let the link abort start

    def release(self, tensors: Sequence[torch.Tensor]) -> bool:
        return self._pool.release_tensors(tensors)

    def stats(self) -> TransportStats:
        sender, receiver = self._sender, self._receiver
        if sender is None or receiver is None:
            raise RuntimeError("transport not started; await transport.start() first")
        return TransportStats(
            num_pending_requests=self._fabric.num_pending(),
            num_orphaned_requests=self._fabric.num_orphaned(),
            num_active_sends=sender.num_active_sends,
            num_incoming=receiver.num_incoming,
            num_remembered=receiver.num_remembered,
            num_bytes_sent=sender.num_bytes_sent,
            num_bytes_received=receiver.num_bytes_received,
            num_pool_allocations=self._pool.num_allocated,
            num_pool_reuses=self._pool.num_reused,
            num_pool_bytes=self._pool.num_pooled_bytes,
            num_bytes_sent_by_class={c.value: n for c, n in sender.num_bytes_sent_by_class.items()},
        )

    async def close(self) -> None:
        if self._is_closed:
            return
        self._is_closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self._sender is not None:
            await self._sender.close()
        if self._receiver is not None:
            await self._receiver.close()
        await self._fabric.close()

    # -- FabricEvents -----------------------------------------------------------------

    def on_control(self, message: ControlMessage, payload: memoryview) -> None:
        if self._is_closed:
            return
        receiver, sender = self._started_receiver(), self._started_sender()
        if isinstance(message, TransferHeader):
            receiver.on_header(message, payload)
        elif isinstance(message, CancelTransfer):
            receiver.on_cancel(message)
        elif isinstance(message, RechunkTransfer):
            receiver.on_rechunk(message)
        elif isinstance(message, RejectTransfer):
            sender.on_reject(message.key, message.reason)

    def on_peer_lost(self, peer_address: bytes, error: TransportError) -> None:
        if self._is_closed:
            return
        if not isinstance(error, PeerUnreachable):
            error = PeerUnreachable(str(error))
        self._started_sender().on_peer_lost(peer_address, error)
        self._started_receiver().on_peer_lost(peer_address, error)

    # -- internals --------------------------------------------------------------------

    def _started_sender(self) -> Sender:
        if self._sender is None:
            raise RuntimeError("transport not started; await transport.start() first")
        if self._is_closed:
            raise TransportError("transport closed")
        return self._sender

    def _started_receiver(self) -> Receiver:
        if self._receiver is None:
            raise RuntimeError("transport not started; await transport.start() first")
        return self._receiver

    async def _sweep_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            try:
                self._started_receiver().sweep(loop.time())
            except Exception:  # the sweeper must outlive any one bad record
                log.exception("kvtransport sweep failed")
