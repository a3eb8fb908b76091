"""Source side, data movement: a migration's KV blocks as stage offers and transfers.

A stage sends blocks [first, first + n) of the request's block table in transfers of
at most stage_chunk_bytes, reading the next chunk while one is on the wire:

    blocks:   [first ........................................ first + n)
    chunks:   |<- chunk 0 ->|<- chunk 1 ->| ... |<- chunk k ->|
    read:      0             1                   k            (worker threads)
    send:                    0             1 ... k-1          k

Each chunk is one StageOffer (an RPC, which also keeps the destination's lease fresh)
and one KV transfer, through staging buffers that are reused: bounded memory, no page
faults per copy, whatever the context length.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

import torch

from kvtransport import TrafficClass, Transport
from kvtransport.errors import TransportError
from services.common.tracing import context_to_dict, get_tracer
from services.worker.engine import LLMEngine
from services.worker.migration.buffers import StagingBuffers
from services.worker.migration.config import MigrationConfig
from services.worker.migration.faults import FaultHooks
from services.worker.migration.status import AbortReason, MigrationAborted
from services.worker.migration.types import DestinationClient, StageOffer

tracer = get_tracer(__name__)


@dataclass
class StageProgress:
    """What one outgoing migration has sent so far."""

    migration_id: str
    transport_address: bytes  # the destination's data plane
    num_stages: int = 0  # stage offers made: one per transfer (+ an empty last one)
    num_blocks_sent: int = 0
    num_bytes: int = 0


class StageSender:
    """Sends the stages of a worker's outgoing migrations (one per MigrationSource)."""

    def __init__(
        self, engine: LLMEngine, transport: Transport, config: MigrationConfig, faults: FaultHooks
    ) -> None:
        self._engine = engine
        self._transport = transport
        self._config = config
        self._faults = faults
        self.buffers = StagingBuffers(config.stage_chunk_bytes)

    async def send_blocks(
        self,
        client: DestinationClient,
        progress: StageProgress,
        first: int,
        block_ids: tuple[int, ...],
        is_last: bool,
    ) -> None:
        """Send blocks [first, first + len(block_ids)) of the block table, chunked and
        read ahead. A last stage with nothing left still sends one empty offer: the
        destination's commit counts on it. Raises MigrationAborted."""
        engine = self._engine
        per_chunk = max(1, self.buffers.chunk_bytes // engine.kv_block_nbytes)
        chunks = [list(block_ids[i : i + per_chunk]) for i in range(0, len(block_ids), per_chunk)]
        if not chunks:
            if is_last:
                await self._send_stage(client, progress, first, None, is_last=True)
            return

        def read(ids: list[int]) -> torch.Tensor:
            kv = engine.kv_cache
            buf = self.buffers.acquire(kv.block_shape(len(ids)), kv.layers[kv.layer_start].dtype)
            return engine.migration.read_kv_blocks(ids, out=buf)

        # A last stage's few blocks are read right here: a thread hop would add downtime
        # (their buffer is a pooled one by then: the stages before used it).
        small = len(block_ids) <= max(self._config.last_stage_max_blocks, 4)
        data = read(chunks[0]) if small else await asyncio.to_thread(read, chunks[0])
        for k, ids in enumerate(chunks):
            is_final = k == len(chunks) - 1
            reading = (
                None if is_final else asyncio.create_task(asyncio.to_thread(read, chunks[k + 1]))
            )
            try:
                await self._send_stage(client, progress, first, data, is_last=is_last and is_final)
            except BaseException:
                if reading is not None:  # let the read finish: it writes into a buffer
                    with contextlib.suppress(Exception):
                        await asyncio.shield(reading)
                raise
            self.buffers.release(data)  # delivered: the buffer is free again
            first += len(ids)
            if reading is not None:
                data = await reading

    async def _send_stage(
        self,
        client: DestinationClient,
        progress: StageProgress,
        first: int,
        data: torch.Tensor | None,
        is_last: bool,
    ) -> None:
        """One stage offer and its transfer: blocks [first, first + data's blocks), in
        one `migration.stage` span (a child of the migration's)."""
        num_blocks = 0 if data is None else data.shape[2]
        with tracer.start_as_current_span(
            "migration.stage",
            attributes={
                "llmesh.stage_index": progress.num_stages,
                "llmesh.first_block": first,
                "llmesh.num_blocks": num_blocks,
                "llmesh.num_bytes": 0 if data is None else data.numel() * data.element_size(),
                "llmesh.is_last": is_last,
            },
        ):
            await self._offer_and_send(client, progress, first, data, is_last)

    async def _offer_and_send(
        self,
        client: DestinationClient,
        progress: StageProgress,
        first: int,
        data: torch.Tensor | None,
        is_last: bool,
    ) -> None:
        stage_index = progress.num_stages
        await self._faults.before_stage(stage_index)
        num_blocks = 0 if data is None else data.shape[2]
        transfer_id = f"mig-{progress.migration_id}-{stage_index}"
        offer = StageOffer(
            progress.migration_id, stage_index, first, num_blocks, transfer_id, is_last
        )
        try:
            ready, reason = await client.stage(offer)
        except ConnectionError as exc:
            raise MigrationAborted(AbortReason.DESTINATION_UNREACHABLE, str(exc)) from exc
        if not ready:
            raise MigrationAborted(AbortReason.DESTINATION_REFUSED, reason)
        if data is not None:
            handle = None
            try:
                handle = await self._transport.send(
                    progress.transport_address,
                    self._faults.transfer_id(stage_index, transfer_id),
                    [data],
                    TrafficClass.KV,
                    context_to_dict(),
                )
                await asyncio.wait_for(handle.wait(), self._config.transfer_timeout_s)
            except (TransportError, TimeoutError) as exc:
                if handle is not None:  # stop the bytes and settle the handle
                    with contextlib.suppress(TransportError):
                        await handle.cancel()
                raise MigrationAborted(
                    AbortReason.TRANSFER_FAILED, f"{type(exc).__name__}: {exc}"
                ) from exc
            progress.num_bytes += data.numel() * data.element_size()
        progress.num_stages += 1
        progress.num_blocks_sent += num_blocks
