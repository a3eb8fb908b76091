"""Migration status machines, with their allowed transitions written down.

Source side (one per migration):

    PREPARING ──▶ COPYING ──▶ STOPPED ──▶ COMMITTING ──▶ COMMITTED
        │            │           │            │
        └────────────┴───────────┴────────────┴──────▶ ABORTED

    PREPARING   handshake: the destination reserves blocks under a lease
    COPYING     stages copy full blocks while the request keeps decoding here
    STOPPED     the request is suspended here; the last blocks are being copied
    COMMITTING  CommitMigration sent; the outcome decides where the request runs
    COMMITTED   the destination runs it; its blocks here are freed
    ABORTED     the request runs here (or finished here); the destination freed its
                reservation (or its lease will)

Destination side (one per reservation):

    RESERVED ──▶ COMMITTING ──▶ COMMITTED
        │            │
        └────────────┴──────▶ ABORTED   (abort RPC, lease expiry, failed receive)
"""

from __future__ import annotations

from enum import StrEnum

from services.common.migration import MigrationMode, MigrationStatus

__all__ = [
    "RESERVATION_TRANSITIONS",
    "SOURCE_TRANSITIONS",
    "AbortReason",
    "IllegalTransition",
    "MigrationAborted",
    "MigrationMode",
    "MigrationStatus",
    "ReservationStatus",
    "check_transition",
]


SOURCE_TRANSITIONS: dict[MigrationStatus, frozenset[MigrationStatus]] = {
    MigrationStatus.PREPARING: frozenset({MigrationStatus.COPYING, MigrationStatus.ABORTED}),
    MigrationStatus.COPYING: frozenset({MigrationStatus.STOPPED, MigrationStatus.ABORTED}),
    MigrationStatus.STOPPED: frozenset({MigrationStatus.COMMITTING, MigrationStatus.ABORTED}),
    MigrationStatus.COMMITTING: frozenset({MigrationStatus.COMMITTED, MigrationStatus.ABORTED}),
    MigrationStatus.COMMITTED: frozenset(),
    MigrationStatus.ABORTED: frozenset(),
}


class ReservationStatus(StrEnum):
    RESERVED = "RESERVED"
    COMMITTING = "COMMITTING"
    COMMITTED = "COMMITTED"
    ABORTED = "ABORTED"


RESERVATION_TRANSITIONS: dict[ReservationStatus, frozenset[ReservationStatus]] = {
    ReservationStatus.RESERVED: frozenset(
        {ReservationStatus.COMMITTING, ReservationStatus.ABORTED}
    ),
    ReservationStatus.COMMITTING: frozenset(
        {ReservationStatus.COMMITTED, ReservationStatus.ABORTED}
    ),
    ReservationStatus.COMMITTED: frozenset(),
    ReservationStatus.ABORTED: frozenset(),
}


class AbortReason(StrEnum):
    """Why a migration did not commit. The request always continues at the source."""

    DESTINATION_REFUSED = "destination_refused"  # no blocks / slot / draining
    DESTINATION_UNREACHABLE = "destination_unreachable"  # RPC failed: peer dead or partitioned
    INCOMPATIBLE = "incompatible"  # KV block layouts differ
    REQUEST_NOT_RUNNING = "request_not_running"  # queued, suspended or unknown at the start
    REQUEST_FINISHED = "request_finished"  # finished or aborted while copying
    REQUEST_PREEMPTED = "request_preempted"  # its blocks were taken back while copying
    TRANSFER_FAILED = "transfer_failed"  # data plane error or timeout
    COMMIT_REFUSED = "commit_refused"  # destination could not adopt it (e.g. lease expired)
    SHUTDOWN = "shutdown"  # this worker is stopping
    LEASE_EXPIRED = "lease_expired"  # destination: the source went silent
    ABORTED_BY_SOURCE = "aborted_by_source"  # destination: AbortMigration


class MigrationAborted(Exception):
    """A source-side migration stops here, for `reason`; the request runs at the source."""

    def __init__(self, reason: AbortReason, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else str(reason))
        self.reason = reason
        self.detail = detail


class IllegalTransition(RuntimeError):
    """An internal invariant broke: a status moved along an edge not listed above."""


def check_transition(table, current, new) -> None:
    if new not in table[current]:
        raise IllegalTransition(f"{current} -> {new} is not an allowed transition")
