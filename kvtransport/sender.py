"""Sender: turns `send` calls into scheduled messages, one PeerScheduler per peer."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Mapping, Sequence

import torch

from kvtransport.chunks import MAX_SEQ, ChunkPlan
from kvtransport.config import TransportConfig
from kvtransport.errors import PeerUnreachable, TransportError
from kvtransport.fabric import ControlOut, Fabric
from kvtransport.handles import SendHandle
from kvtransport.outbound import Outbound, TransferMessages
from kvtransport.priority import PeerScheduler, kv_chunk_bytes
from kvtransport.tensors import as_sendable, byte_view, spec_of
from kvtransport.traffic import ActivationFlow, TrafficClass
from kvtransport.wire import KEY_BITS, TransferHeader, encode, meta_size

log = logging.getLogger(__name__)


class Sender:
    def __init__(
        self, fabric: Fabric, config: TransportConfig, activations: ActivationFlow
    ) -> None:
        self._fabric = fabric
        self._config = config
        self._activations = activations
        self._schedulers: dict[bytes, PeerScheduler] = {}
        self._connecting: dict[bytes, asyncio.Future[PeerScheduler]] = {}
        self._schedulers_by_key: dict[int, PeerScheduler] = {}
        self._tasks: set[asyncio.Task] = set()
        self._is_closed = False
        self.num_bytes_sent = 0
        self.num_bytes_sent_by_class = dict.fromkeys(TrafficClass, 0)  # for monitoring

    @property
    def num_active_sends(self) -> int:
        return sum(s.num_active for s in self._schedulers.values())

    async def send(
        self,
        peer_address: bytes,
        transfer_id: str,
        tensors: torch.Tensor | Sequence[torch.Tensor],
        traffic_class: TrafficClass,
        metadata: Mapping[str, str] | None,
    ) -> SendHandle:
        if self._is_closed:
            raise TransportError("transport closed")
        if not isinstance(peer_address, bytes | bytearray) or not peer_address:
            raise ValueError(f"peer_address must be non-empty bytes, got {peer_address!r}")
        if not isinstance(transfer_id, str) or not transfer_id:
            raise ValueError(f"transfer_id must be a non-empty string, got {transfer_id!r}")
        traffic_class = TrafficClass(traffic_class)
        metadata = dict(metadata or {})
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError(f"metadata must map strings to strings, got {metadata!r}")
        tensors = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
        sources = [as_sendable(t) for t in tensors]
        views = [byte_view(t) for t in sources]
        specs = tuple(spec_of(t) for t in sources)
        num_bytes_total = sum(spec.nbytes for spec in specs)
        is_inline = num_bytes_total <= self._config.inline_max_bytes
        chunk_bytes = (
            kv_chunk_bytes(self._config, self._activations)
            if traffic_class is TrafficClass.KV
            else 0  # activations are not chunked
        )
        plan = ChunkPlan.of([] if is_inline else specs, chunk_bytes)
        if plan.num_chunks > MAX_SEQ:
            raise ValueError(
                f"transfer {transfer_id!r} needs {plan.num_chunks} chunks, more than {MAX_SEQ}; "
                "raise kv_chunk_bytes or split it"
            )
        scheduler = await self._scheduler_for(bytes(peer_address))
        key = self._new_key()
        header = TransferHeader(
            transfer_id=transfer_id,
            key=key,
            sender=self._fabric.address,
            traffic_class=traffic_class,
            tensors=specs,
            chunk_bytes=chunk_bytes,
            is_inline=is_inline,
            metadata=metadata,
        )
        payload = b"".join(view.tobytes() for view in views) if is_inline else b""
        frame = encode(header, payload)
        if meta_size(frame) > self._config.max_header_bytes:
            raise ValueError(
                f"header of {transfer_id!r} is {meta_size(frame)} bytes, over "
                f"max_header_bytes={self._config.max_header_bytes} (too many tensors/metadata)"
            )
        messages = TransferMessages(
            ControlOut(frame, traffic_class, len(payload)), key, plan, views, traffic_class
        )
        handle = SendHandle(transfer_id, traffic_class, num_bytes_total, scheduler)
        self._schedulers_by_key[key] = scheduler
        scheduler.submit(Outbound(handle, key, messages, sources))
        return handle

    def send_reject(self, peer_address: bytes, frame: bytes) -> None:
        """Best-effort control frame to a peer we may not have a link to yet."""
        if not self._is_closed:
            self._spawn(self._send_reject(peer_address, frame))

    def on_reject(self, key: int, reason: str) -> None:
        scheduler = self._schedulers_by_key.get(key)
        if scheduler is not None:
            scheduler.reject(key, reason)

    def on_peer_lost(self, peer_address: bytes, error: PeerUnreachable) -> None:
        scheduler = self._schedulers.get(peer_address)
        if scheduler is not None:
            scheduler.fail(error)

    async def close(self) -> None:
        self._is_closed = True
        for scheduler in list(self._schedulers.values()):
            scheduler.fail(TransportError("transport closed"))
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- internals --------------------------------------------------------------------

    async def _scheduler_for(self, peer_address: bytes) -> PeerScheduler:
        scheduler = self._schedulers.get(peer_address)
        if scheduler is not None:
            return scheduler
        pending = self._connecting.get(peer_address)
        if pending is None:
            pending = asyncio.get_running_loop().create_future()
            self._connecting[peer_address] = pending
            try:
                link = await self._fabric.connect(peer_address)
            except BaseException as exc:
                if not isinstance(exc, Exception):  # cancelled: others must not look cancelled
                    exc = PeerUnreachable("connecting to the peer was interrupted")
                pending.set_exception(exc)
                pending.exception()
                raise
            finally:
                del self._connecting[peer_address]
            scheduler = PeerScheduler(
                peer_address,
                link,
                self._config,
                self._on_transfer_finished,
                self._on_failed,
                self._activations,
            )
            self._schedulers[peer_address] = scheduler
            pending.set_result(scheduler)
            return scheduler
        return await asyncio.shield(pending)

    def _new_key(self) -> int:
        while True:
            key = secrets.randbits(KEY_BITS)
            if key not in self._schedulers_by_key:
                return key

    def _on_transfer_finished(self, outbound: Outbound) -> None:
        self._schedulers_by_key.pop(outbound.key, None)
        self.num_bytes_sent += outbound.handle.num_bytes_sent
        self.num_bytes_sent_by_class[outbound.handle.traffic_class] += (
            outbound.handle.num_bytes_sent
        )

    def _on_failed(self, scheduler: PeerScheduler) -> None:
        if self._schedulers.get(scheduler.peer_address) is scheduler:
            del self._schedulers[scheduler.peer_address]
        self._spawn(self._retire(scheduler))

    async def _retire(self, scheduler: PeerScheduler) -> None:
        await scheduler.link.abort()
        await scheduler.close()

    async def _send_reject(self, peer_address: bytes, frame: bytes) -> None:
        try:
            scheduler = await asyncio.wait_for(
                self._scheduler_for(peer_address), self._config.cancel_grace_s
            )
        except (TransportError, ValueError, TimeoutError) as exc:
            log.debug("reject not delivered: %s", exc)
            return
        scheduler.send_control(frame)

    def _spawn(self, coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
