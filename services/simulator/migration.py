"""Simulated live migration, following the live protocol's phases (services/worker/migration/):

    handshake   the destination reserves as many blocks as the request holds now
                (refused: no room, or the destination is draining)
    stage k     copy blocks [num_copied, table_len) while the request keeps decoding
                on the source; full blocks copied are final (the KV is append-only)
                the next stage copies what was produced meanwhile:

                  block table  | 0 1 2 ... num_copied | ... table_len-1 |
                               |<--- done (final) --->|<-- this stage -->|

    last stage  when the remaining delta is <= `last_stage_max_blocks`: at the
                source's next step boundary, suspend the request, reserve the rest,
                copy the delta + request state (the downtime)
    commit      the destination adopts the reserved blocks and runs the request; the
                source frees its copy
    abort       the request finished, was preempted, or the destination ran out of
                room: release the reservation, resume on the source if suspended

A stage lasts bytes / bandwidth + a fixed per-stage overhead (handshake/commit RPCs).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

from services.common.config import require
from services.simulator.instance import SimInstance
from services.simulator.loop import EventLoop
from services.worker.engine.request import Request, RequestStatus


class MigrationStatus(enum.Enum):
    """STAGING -> STAGING | LAST_STAGE | ABORTED; LAST_STAGE -> COMMITTED | ABORTED."""

    STAGING = "staging"
    LAST_STAGE = "last_stage"
    COMMITTED = "committed"
    ABORTED = "aborted"


_ALLOWED = {
    MigrationStatus.STAGING: {
        MigrationStatus.STAGING,
        MigrationStatus.LAST_STAGE,
        MigrationStatus.ABORTED,
    },
    MigrationStatus.LAST_STAGE: {MigrationStatus.COMMITTED, MigrationStatus.ABORTED},
    MigrationStatus.COMMITTED: set(),
    MigrationStatus.ABORTED: set(),
}


@dataclass(frozen=True)
class MigrationCost:
    """How long copying takes."""

    # Bytes of KV per block (all layers, K and V).
    bytes_per_block: int
    # Link bandwidth between instances, bytes per second.
    bandwidth_bytes_per_s: float = 8e9
    # Fixed cost per stage (control RPCs, launching the copy), seconds.
    stage_overhead_s: float = 0.001
    # Stop-and-copy once at most this many blocks remain.
    last_stage_max_blocks: int = 2

    def __post_init__(self) -> None:
        require(self.bytes_per_block > 0, f"bytes_per_block={self.bytes_per_block} must be > 0")
        require(
            self.bandwidth_bytes_per_s > 0,
            f"bandwidth_bytes_per_s={self.bandwidth_bytes_per_s} must be > 0",
        )
        require(
            self.stage_overhead_s >= 0, f"stage_overhead_s={self.stage_overhead_s} must be >= 0"
        )
        require(
            self.last_stage_max_blocks >= 1,
            f"last_stage_max_blocks={self.last_stage_max_blocks} must be >= 1",
        )

    def copy_s(self, num_blocks: int) -> float:
        return (
            num_blocks * self.bytes_per_block / self.bandwidth_bytes_per_s + self.stage_overhead_s
        )


@dataclass
class SimMigration:
    migration_id: int
    request: Request
    src: SimInstance
    dst: SimInstance
    started_s: float
    num_preemptions_at_start: int
    status: MigrationStatus = MigrationStatus.STAGING
    reserved_block_ids: list[int] = field(default_factory=list)
    num_copied_blocks: int = 0
    num_stages: int = 0
    wants_last_stage: bool = False
    suspended_s: float = 0.0

    def set_status(self, status: MigrationStatus) -> None:
        assert status in _ALLOWED[self.status], (self.status, status)
        self.status = status


@dataclass
class MigrationStats:
    num_started: int = 0
    num_committed: int = 0
    num_aborted: int = 0
    total_downtime_s: float = 0.0
    max_downtime_s: float = 0.0
    num_bytes: int = 0


class MigrationManager:
    """Runs simulated migrations on the event loop.

    `on_commit(migration)` and `on_change(instance)` let the simulator update request
    records and restart idle instances.
    """

    def __init__(
        self,
        loop: EventLoop,
        cost: MigrationCost,
        on_commit: Callable[[SimMigration], None],
        on_change: Callable[[SimInstance], None],
    ) -> None:
        self.loop = loop
        self.cost = cost
        self.on_commit = on_commit
        self.on_change = on_change
        self.stats = MigrationStats()
        self._next_id = 0
        self._waiting_last_stage: dict[str, list[SimMigration]] = {}
        self.active: dict[int, SimMigration] = {}

    # ---- start ----------------------------------------------------------------------

    def start(self, src: SimInstance, dst: SimInstance, request_id: str) -> bool:
        """Handshake: reserve on dst and start the first stage; False if dst refuses."""
        request = src.scheduler.requests[request_id]
        num_blocks = len(src.block_manager.block_ids(request_id))
        if dst.is_terminating or not dst.block_manager.can_reserve(num_blocks):
            return False
        self._next_id += 1
        migration = SimMigration(
            self._next_id, request, src, dst, self.loop.now, request.num_preemptions
        )
        migration.reserved_block_ids = dst.engine.migration.reserve_blocks(num_blocks)
        src.migrating_out.add(request.request_id)
        src.num_migrating += 1
        dst.num_migrating += 1
        src.touch()
        dst.touch()
        self.active[migration.migration_id] = migration
        self.stats.num_started += 1
        self._start_stage(migration)
        return True

    # ---- stages ---------------------------------------------------------------------

    def _start_stage(self, migration: SimMigration) -> None:
        bm = migration.src.block_manager
        request = migration.request
        table_len = len(bm.block_ids(request.request_id))
        num_blocks = table_len - migration.num_copied_blocks
        # Full blocks computed now are final once copied; the partial tail is re-sent.
        migration.num_copied_blocks = request.num_computed_tokens // bm.block_size
        migration.num_stages += 1
        self.stats.num_bytes += num_blocks * self.cost.bytes_per_block
        self.loop.at(self.loop.now + self.cost.copy_s(num_blocks), self._stage_done, migration)

    def _is_intact(self, migration: SimMigration) -> bool:
        request = migration.request
        return (
            migration.src.scheduler.requests.get(request.request_id) is request
            and request.status in (RequestStatus.RUNNING, RequestStatus.SUSPENDED)
            and request.num_preemptions == migration.num_preemptions_at_start
        )

    def _stage_done(self, migration: SimMigration) -> None:
        if migration.status is not MigrationStatus.STAGING:
            return
        if not self._is_intact(migration):
            self._abort(migration)
            return
        table_len = len(migration.src.block_manager.block_ids(migration.request.request_id))
        if not self._reserve_up_to(migration, table_len):
            self._abort(migration)
            return
        if table_len - migration.num_copied_blocks > self.cost.last_stage_max_blocks:
            migration.set_status(MigrationStatus.STAGING)
            self._start_stage(migration)
        elif migration.src.is_busy:
            migration.wants_last_stage = True
            self._waiting_last_stage.setdefault(migration.src.instance_id, []).append(migration)
        else:
            self._last_stage(migration)

    def on_step_end(self, src: SimInstance) -> None:
        """The source is between steps: suspend requests waiting for their last stage."""
        for migration in self._waiting_last_stage.pop(src.instance_id, ()):
            if migration.status is not MigrationStatus.STAGING:
                continue
            if not self._is_intact(migration):
                self._abort(migration)
            else:
                self._last_stage(migration)

    def _last_stage(self, migration: SimMigration) -> None:
        request = migration.request
        table_len = len(migration.src.block_manager.block_ids(request.request_id))
        if not self._reserve_up_to(migration, table_len):
            self._abort(migration)
            return
        migration.set_status(MigrationStatus.LAST_STAGE)
        migration.src.engine.migration.suspend_request(request.request_id)
        migration.suspended_s = self.loop.now
        migration.src.touch()
        num_blocks = table_len - migration.num_copied_blocks
        self.stats.num_bytes += num_blocks * self.cost.bytes_per_block
        self.loop.at(self.loop.now + self.cost.copy_s(num_blocks), self._commit, migration)

    def _reserve_up_to(self, migration: SimMigration, num_blocks: int) -> bool:
        missing = num_blocks - len(migration.reserved_block_ids)
        bm = migration.dst.block_manager
        if missing <= 0:
            return True
        if not bm.can_reserve(missing):
            return False
        migration.reserved_block_ids.extend(migration.dst.engine.migration.reserve_blocks(missing))
        migration.dst.touch()
        return True

    # ---- end ------------------------------------------------------------------------

    def _commit(self, migration: SimMigration) -> None:
        if migration.status is not MigrationStatus.LAST_STAGE:
            return
        src, dst, request = migration.src, migration.dst, migration.request
        table_len = len(src.block_manager.block_ids(request.request_id))
        extra = migration.reserved_block_ids[table_len:]
        if extra:  # the request's table shrank below the reservation: give the rest back
            dst.engine.migration.release_blocks(extra)
        migration.set_status(MigrationStatus.COMMITTED)
        dst.import_request(src.remove(request.request_id), migration.reserved_block_ids[:table_len])
        downtime = self.loop.now - migration.suspended_s
        self.stats.num_committed += 1
        self.stats.total_downtime_s += downtime
        self.stats.max_downtime_s = max(self.stats.max_downtime_s, downtime)
        self._finish(migration)
        self.on_commit(migration)

    def _abort(self, migration: SimMigration) -> None:
        request = migration.request
        migration.set_status(MigrationStatus.ABORTED)
        if migration.reserved_block_ids:
            migration.dst.engine.migration.release_blocks(migration.reserved_block_ids)
            migration.reserved_block_ids = []
        if request.status is RequestStatus.SUSPENDED:
            migration.src.engine.migration.resume_request(request.request_id)
        self.stats.num_aborted += 1
        self._finish(migration)

    def _finish(self, migration: SimMigration) -> None:
        src, dst = migration.src, migration.dst
        src.migrating_out.discard(migration.request.request_id)
        src.num_migrating -= 1
        dst.num_migrating -= 1
        del self.active[migration.migration_id]
        src.touch()
        dst.touch()
        self.on_change(src)
        self.on_change(dst)
