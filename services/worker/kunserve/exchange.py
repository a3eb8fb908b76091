"""KV exchange between the members of a group, in the data plane's KV class.

At a drop, every running request holds KV for all layers on the member it ran on;
the slices of the layers other members now keep go to them, one transfer per
(request, receiving member), read before the member freed those layers:

    member r, request X (group blocks G_X)
      layers of stage s != r  --kvx/<key>/<X>/<r>-<s>-->  stage s writes them at G_X

At a restore, the other way round: each member sends its layers' slices of a request
to the member the request goes home to (written at its new local blocks).

A request waits only for its own transfers. Activations overtake KV at every chunk
boundary (the transport's priority); on top of that, while this member sends an
activation to a peer, its KV transfers to that peer are paused (no new chunks) and
resumed once the activation is through, so an activation never queues behind more
than the chunks already on the wire. Pauses are counted per transfer.

The receiving member writes a transfer into its pool in pieces (kv_pieces: one layer
and at most WRITE_PIECE_BYTES of blocks each), one hop to a worker thread per piece:
between two pieces the event loop runs whatever arrived meanwhile, an activation
included, where one copy of a whole transfer (16 MiB in the benchmark) held the
member's second core for its whole length (activation p99 during an exchange 3.1 ms
with whole writes, 1.6 ms with 2 MiB pieces, 1.6 ms with no write at all; idle 0.9).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

import torch
from opentelemetry import trace

from kvtransport import SendHandle, TrafficClass, Transport, TransportConfig
from services.common.groups import KVTransferSpec
from services.common.logging import get_logger

log = get_logger(__name__)
tracer = trace.get_tracer("llmesh.worker")

DEFAULT_CHUNK_BYTES = TransportConfig().kv_chunk_bytes
WRITE_PIECE_BYTES = 2 * 1024 * 1024


@dataclass(frozen=True)
class KVPiece:
    layer: int  # the piece's one layer (absolute index)
    block_ids: list[int]  # where its blocks go
    data: torch.Tensor  # (1, 2, len(block_ids), block_size, kv heads, head dim), a view


def kv_pieces(
    spec: KVTransferSpec, data: torch.Tensor, max_bytes: int = WRITE_PIECE_BYTES
) -> Iterator[KVPiece]:
    """`data` (layers, 2, blocks, ...) of `spec`, cut into one-layer pieces of at most
    max_bytes (at least one block each), in layer then block order."""
    num_layers, _, num_blocks = data.shape[:3]
    if num_layers != spec.layer_end - spec.layer_start or num_blocks != len(spec.dst_block_ids):
        raise ValueError(
            f"KV of {spec.transfer_id} has shape {tuple(data.shape)}: expected "
            f"{spec.layer_end - spec.layer_start} layers of {len(spec.dst_block_ids)} blocks"
        )
    block_nbytes = data[0, :, :1].numel() * data.element_size()  # one layer's K and V
    step = max(1, max_bytes // max(1, block_nbytes))
    for i in range(num_layers):
        for start in range(0, num_blocks, step):
            yield KVPiece(
                spec.layer_start + i,
                list(spec.dst_block_ids[start : start + step]),
                data[i : i + 1, :, start : start + step],
            )


@dataclass(eq=False)  # kept in sets: identity, not field equality
class SendRecord:
    spec: KVTransferSpec
    num_bytes: int
    started_at: float
    handle: SendHandle | None = None
    num_pauses: int = 0
    finished_at: float = 0.0
    error: str = ""


@dataclass
class ExchangeStats:
    num_sent: int = 0
    num_received: int = 0
    num_bytes_sent: int = 0
    num_bytes_received: int = 0
    num_pauses: int = 0
    send_s: float = 0.0  # summed wall time of finished sends
    records: list[SendRecord] = field(default_factory=list)


class KVExchange:
    """One member's KV transfers (sends and receives) for one group."""

    def __init__(
        self, transport: Transport, timeout_s: float, chunk_bytes: int = DEFAULT_CHUNK_BYTES
    ) -> None:
        self._transport = transport
        self.timeout_s = timeout_s
        self.chunk_bytes = chunk_bytes  # the transport's KV chunk (spans count chunks)
        self._active: dict[bytes, set[SendRecord]] = collections.defaultdict(set)
        self._activations: collections.Counter[bytes] = collections.Counter()
        self._tasks: set[asyncio.Task] = set()
        self.stats = ExchangeStats()

    # ---- activations come first ---------------------------------------------------------

    @contextlib.contextmanager
    def activation_to(self, peer: bytes):
        """Around an activation send to `peer`: KV transfers to it pause, then resume."""
        self._activations[peer] += 1
        if self._activations[peer] == 1:
            for record in self._active.get(peer, ()):
                if record.handle is not None:
                    record.handle.pause()
                    record.num_pauses += 1
                    self.stats.num_pauses += 1
        try:
            yield
        finally:
            self._activations[peer] -= 1
            if self._activations[peer] == 0:
                del self._activations[peer]
                for record in self._active.get(peer, ()):
                    if record.handle is not None:
                        record.handle.resume()

    # ---- sends ----------------------------------------------------------------------------

    def send(
        self,
        spec: KVTransferSpec,
        peer: bytes,
        data: torch.Tensor,
        on_done: Callable[[KVTransferSpec, str], None] | None = None,
        metadata: dict[str, str] | None = None,
    ) -> None:
        """Start sending `data` (a CPU tensor nobody writes any more) in the background."""
        record = SendRecord(spec, data.numel() * data.element_size(), time.perf_counter())
        self.stats.records.append(record)
        self._spawn(self._send(record, peer, data, on_done, metadata))

    async def _send(self, record, peer, data, on_done, metadata) -> None:
        span = tracer.start_span(
            "kunserve.exchange.send",
            attributes={
                "llmesh.request_id": record.spec.request_id,
                "llmesh.transfer_id": record.spec.transfer_id,
                "llmesh.to_stage": record.spec.to_stage,
                "llmesh.num_bytes": record.num_bytes,
                "llmesh.num_chunks": max(1, -(-record.num_bytes // self.chunk_bytes)),
            },
        )
        try:
            record.handle = await self._transport.send(
                peer, record.spec.transfer_id, [data], TrafficClass.KV, metadata
            )
            self._active[peer].add(record)
            if self._activations[peer]:
                record.handle.pause()
                record.num_pauses += 1
                self.stats.num_pauses += 1
            await record.handle.wait()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported to the caller
            record.error = f"{type(exc).__name__}: {exc}"
        finally:
            self._active[peer].discard(record)
            record.finished_at = time.perf_counter()
            span.set_attribute("llmesh.num_pauses", record.num_pauses)
            span.set_attribute("llmesh.error", record.error)
            span.end()
        if not record.error:
            self.stats.num_sent += 1
            self.stats.num_bytes_sent += record.num_bytes
            self.stats.send_s += record.finished_at - record.started_at
        else:
            log.warning(
                "kv_exchange_send_failed",
                transfer_id=record.spec.transfer_id,
                error=record.error,
            )
        if on_done is not None:
            on_done(record.spec, record.error)

    # ---- receives -------------------------------------------------------------------------

    def receive(
        self,
        spec: KVTransferSpec,
        write: Callable[[KVTransferSpec, torch.Tensor], Awaitable[None]],
        on_done: Callable[[KVTransferSpec, str], Awaitable[None] | None],
    ) -> None:
        """Post the receive of `spec`; `write(spec, data)` places it, then `on_done(spec,
        error)` reports (error "" when the slices are in place)."""
        self._spawn(self._receive(spec, write, on_done))

    async def _receive(self, spec, write, on_done) -> None:
        error = ""
        try:
            received = await self._transport.recv(spec.transfer_id, timeout=self.timeout_s)
            try:
                [data] = received
                await write(spec, data)
                self.stats.num_received += 1
                self.stats.num_bytes_received += data.numel() * data.element_size()
            finally:
                self._transport.release(received)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported to the caller
            error = f"{type(exc).__name__}: {exc}"
            log.warning("kv_exchange_receive_failed", transfer_id=spec.transfer_id, error=error)
        result = on_done(spec, error)
        if asyncio.iscoroutine(result):
            await result

    # ---- lifecycle ------------------------------------------------------------------------

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def num_pending(self) -> int:
        return len(self._tasks)

    async def wait_idle(self, timeout_s: float) -> bool:
        """True once every send and receive ended (within timeout_s)."""
        deadline = time.monotonic() + timeout_s
        while self._tasks:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            await asyncio.wait(set(self._tasks), timeout=remaining)
        return True

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
