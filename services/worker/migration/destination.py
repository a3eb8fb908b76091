"""Destination side: reservations under leases, stage receives, idempotent commit.

A reservation holds blocks outside any request (engine.migration.reserve_blocks). Each stage
posts a data-plane receive into a staging tensor and copies it into the reserved
blocks. Commit waits for every stage, adopts the request (engine.migration.import_request) and
remembers (request_id, migration_id) so a repeated commit, after a lost reply, answers
"committed" without running the request twice. A reservation that sees no RPC for
its lease (the one the source offered, PrepareOffer.lease_s, else this worker's
MigrationConfig.lease_s) is freed: a dead source can never leak blocks here. A
handshake from an engine on other kernels is refused (compatibility.py): its request
would not continue the same tokens here.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kvtransport import Transport
from kvtransport.errors import TransportError
from services.common.logging import get_logger
from services.worker.async_engine import AsyncEngine
from services.worker.engine import LLMEngine
from services.worker.engine.errors import NoFreeBlocksError
from services.worker.migration.buffers import StagingBuffers
from services.worker.migration.compatibility import device_mismatch, kernels_mismatch
from services.worker.migration.config import MigrationConfig
from services.worker.migration.status import (
    RESERVATION_TRANSITIONS,
    AbortReason,
    ReservationStatus,
    check_transition,
)
from services.worker.migration.types import (
    CommitOffer,
    PrepareOffer,
    PrepareReply,
    RequestHandoff,
    StageOffer,
)

log = get_logger(__name__)

# How many committed (request_id, migration_id) keys are remembered for idempotency.
_COMMITTED_MEMORY = 4096


@dataclass
class Reservation:
    offer: PrepareOffer
    block_ids: list[int]
    last_touch: float  # the lease's clock when the source was last heard from
    lease_s: float  # freed when the source is silent this long (its offer's lease)
    status: ReservationStatus = ReservationStatus.RESERVED
    receives: list[asyncio.Task] = field(default_factory=list)
    transfer_ids: list[str] = field(default_factory=list)
    num_received_blocks: int = 0

    def set_status(self, status: ReservationStatus) -> None:
        check_transition(RESERVATION_TRANSITIONS, self.status, status)
        self.status = status


class MigrationDestination:
    def __init__(
        self,
        async_engine: AsyncEngine,
        transport: Transport,
        config: MigrationConfig,
        on_adopting: Callable[[RequestHandoff], None] | None = None,
        on_adopt_failed: Callable[[RequestHandoff], None] | None = None,
        is_draining: Callable[[], bool] = lambda: False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """on_adopting(handoff) runs just before the engine adopts the request, so its
        owner is known before its first output; on_adopt_failed undoes it. `clock`
        measures leases (tests inject one)."""
        self._clock = clock
        self._engine = async_engine
        self._transport = transport
        self._config = config
        self._on_adopting = on_adopting
        self._on_adopt_failed = on_adopt_failed
        self._is_draining = is_draining
        self._reservations: dict[str, Reservation] = {}
        self._buffers = StagingBuffers(config.stage_chunk_bytes)
        self._committed: collections.OrderedDict[tuple[str, str], None] = collections.OrderedDict()
        self._lease_task: asyncio.Task | None = None
        self.num_committed = 0
        self.num_aborted = 0

    # ---- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        self._lease_task = asyncio.create_task(self._lease_loop(), name="migration-leases")

    async def close(self) -> None:
        if self._lease_task is not None:
            self._lease_task.cancel()
        for migration_id in list(self._reservations):
            await self.abort(migration_id, AbortReason.SHUTDOWN)

    @property
    def num_active(self) -> int:
        return len(self._reservations)

    def reserved_block_count(self) -> int:
        return sum(len(r.block_ids) for r in self._reservations.values())

    # ---- RPC handlers ----------------------------------------------------------------

    async def prepare(self, offer: PrepareOffer) -> PrepareReply:
        engine_nbytes = self._engine.engine.kv_block_nbytes
        existing = self._reservations.get(offer.migration_id)
        if existing is not None:  # a retried handshake
            existing.last_touch = self._clock()
            return PrepareReply(True, "", engine_nbytes)
        engine = self._engine.engine
        mismatch = kernels_mismatch(offer.kernels, engine.kernels) or device_mismatch(
            offer.device, engine.device_kind
        )
        if mismatch is not None:
            log.warning(
                "migration_refused",
                migration_id=offer.migration_id,
                request_id=offer.request_id,
                reason=mismatch,
            )
            return PrepareReply(False, mismatch)
        if self._is_draining():
            return PrepareReply(False, "draining")
        if len(self._reservations) >= self._config.max_incoming:
            return PrepareReply(False, "no_migration_slot")
        if offer.num_blocks < 0:
            raise ValueError(f"num_blocks={offer.num_blocks} must be >= 0")

        def reserve(engine: LLMEngine) -> list[int] | str:
            # Again between two steps: a KunServe PrepareJoin that ran just before
            # claims this worker, and a reservation would make its join fail.
            if self._is_draining():
                return "draining"
            if engine.request_status(offer.request_id) is not None:
                return "duplicate_request"
            try:
                return engine.migration.reserve_blocks(offer.num_blocks)
            except NoFreeBlocksError:
                return "no_free_blocks"

        outcome = await self._engine.run(reserve)
        if isinstance(outcome, str):
            return PrepareReply(False, outcome)
        # The source's lease, if it offered one; else this worker's.
        lease_s = offer.lease_s if offer.lease_s > 0 else self._config.lease_s
        self._reservations[offer.migration_id] = Reservation(offer, outcome, self._clock(), lease_s)
        log.info(
            "migration_reserved",
            migration_id=offer.migration_id,
            request_id=offer.request_id,
            num_blocks=len(outcome),
        )
        return PrepareReply(True, "", engine_nbytes)

    async def stage(self, offer: StageOffer) -> tuple[bool, str]:
        reservation = self._reservations.get(offer.migration_id)
        if reservation is None or reservation.status is not ReservationStatus.RESERVED:
            return False, "unknown_migration"
        reservation.last_touch = self._clock()
        if offer.first_block_index < 0 or offer.num_blocks < 0:
            raise ValueError(
                f"first_block_index={offer.first_block_index} and num_blocks={offer.num_blocks} must be >= 0"
            )
        end = offer.first_block_index + offer.num_blocks
        missing = end - len(reservation.block_ids)
        if missing > 0:
            try:
                more = await self._engine.run(lambda e: e.migration.reserve_blocks(missing))
            except NoFreeBlocksError:
                return False, "no_free_blocks"
            if reservation.status is not ReservationStatus.RESERVED:  # aborted meanwhile
                await self._engine.run(lambda e: e.migration.release_blocks(more))
                return False, "unknown_migration"
            reservation.block_ids.extend(more)
        block_ids = reservation.block_ids[offer.first_block_index : end]
        if offer.num_blocks:
            reservation.transfer_ids.append(offer.transfer_id)
            reservation.receives.append(
                asyncio.create_task(self._receive(reservation, block_ids, offer.transfer_id))
            )
        return True, ""

    async def _receive(
        self, reservation: Reservation, block_ids: list[int], transfer_id: str
    ) -> None:
        engine = self._engine.engine
        kv_cache = engine.kv_cache
        staging = await asyncio.to_thread(
            self._buffers.acquire,
            kv_cache.block_shape(len(block_ids)),
            kv_cache.layers[kv_cache.layer_start].dtype,
        )
        # Should the receive fail or be cancelled, the buffer is not given back: the data
        # plane may still be writing into it.
        await self._transport.recv(
            transfer_id, into=[staging], timeout=self._config.transfer_timeout_s
        )
        if reservation.status is ReservationStatus.ABORTED:
            return
        # Reserved blocks belong to this reservation alone: the engine never reads or
        # writes them, so the copy can run beside its steps instead of stalling them.
        await asyncio.to_thread(engine.migration.write_kv_blocks, block_ids, staging)
        self._buffers.release(staging)
        reservation.num_received_blocks += len(block_ids)
        reservation.last_touch = self._clock()

    async def commit(self, offer: CommitOffer) -> tuple[bool, str]:
        request_id = offer.handoff.state.request_id
        key = (request_id, offer.migration_id)
        if key in self._committed:
            return True, "already_committed"
        reservation = self._reservations.get(offer.migration_id)
        if reservation is None:
            return False, "unknown_migration"
        if reservation.status is not ReservationStatus.RESERVED:
            return False, f"reservation_{reservation.status.value.lower()}"
        if reservation.offer.request_id != request_id:
            raise ValueError(
                f"request_id={request_id!r} does not match the reservation's {reservation.offer.request_id!r}"
            )
        reservation.set_status(ReservationStatus.COMMITTING)
        reservation.last_touch = self._clock()
        try:
            await asyncio.gather(*reservation.receives)
        except (TransportError, asyncio.CancelledError) as exc:
            await self._abort(reservation, f"{AbortReason.TRANSFER_FAILED}: {type(exc).__name__}")
            return False, AbortReason.TRANSFER_FAILED.value
        if reservation.num_received_blocks != offer.num_blocks:
            await self._abort(reservation, "block_count_mismatch")
            return False, (
                f"num_blocks={offer.num_blocks} but {reservation.num_received_blocks} blocks arrived"
            )
        used = reservation.block_ids[: offer.num_blocks]
        extra = reservation.block_ids[offer.num_blocks :]
        state = offer.handoff.state

        def adopt(engine: LLMEngine) -> None:
            if extra:
                engine.migration.release_blocks(extra)
            engine.migration.import_request(state, used)

        if self._on_adopting is not None:
            self._on_adopting(offer.handoff)
        try:
            await self._engine.run(adopt)
        except ValueError as exc:
            if self._on_adopt_failed is not None:
                self._on_adopt_failed(offer.handoff)
            await self._abort(reservation, f"import_failed: {exc}", release=used)
            return False, f"import_failed: {exc}"
        reservation.set_status(ReservationStatus.COMMITTED)
        reservation.block_ids = []
        del self._reservations[offer.migration_id]
        self._remember(key)
        self.num_committed += 1
        log.info("migration_adopted", migration_id=offer.migration_id, request_id=request_id)
        return True, ""

    async def abort(self, migration_id: str, reason: str) -> bool:
        reservation = self._reservations.get(migration_id)
        if reservation is None or reservation.status is not ReservationStatus.RESERVED:
            return False
        await self._abort(reservation, reason)
        return True

    # ---- internals -------------------------------------------------------------------

    async def _abort(
        self, reservation: Reservation, reason: str, release: list[int] | None = None
    ) -> None:
        reservation.set_status(ReservationStatus.ABORTED)
        self._reservations.pop(reservation.offer.migration_id, None)
        for transfer_id in reservation.transfer_ids:
            await self._transport.cancel_recv(transfer_id)
        for task in reservation.receives:
            task.cancel()
        await asyncio.gather(*reservation.receives, return_exceptions=True)
        blocks = reservation.block_ids if release is None else release
        reservation.block_ids = []
        if blocks:
            await self._engine.run(lambda e: e.migration.release_blocks(blocks))
        self.num_aborted += 1
        log.info(
            "migration_reservation_aborted",
            migration_id=reservation.offer.migration_id,
            request_id=reservation.offer.request_id,
            reason=str(reason),
        )

    def _remember(self, key: tuple[str, str]) -> None:
        self._committed[key] = None
        while len(self._committed) > _COMMITTED_MEMORY:
            self._committed.popitem(last=False)

    async def _lease_loop(self) -> None:
        while True:
            shortest = min(
                [self._config.lease_s, *(r.lease_s for r in self._reservations.values())]
            )
            await asyncio.sleep(shortest / 4)
            now = self._clock()
            for reservation in list(self._reservations.values()):
                if reservation.status is not ReservationStatus.RESERVED:
                    continue
                # A receive still in progress counts as activity: bytes are flowing.
                is_receiving = any(not t.done() for t in reservation.receives)
                if not is_receiving and now - reservation.last_touch > reservation.lease_s:
                    await self._abort(reservation, AbortReason.LEASE_EXPIRED)
