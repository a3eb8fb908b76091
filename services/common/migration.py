"""The live-migration vocabulary shared by workers, the CLI and the protos' converters.

The state machines that move through these statuses (which transitions are allowed)
live with the protocol, in services/worker/migration/status.py.
"""

from __future__ import annotations

from enum import StrEnum


class MigrationMode(StrEnum):
    """How the request's KV reaches the destination."""

    LIVE = "live"  # stages while decoding, then a short stop-and-copy (Llumnix)
    BLOCKING_COPY = "blocking_copy"  # stop, copy every block, resume (baseline)
    RECOMPUTE = "recompute"  # stop, send only tokens; the destination re-prefills (baseline)


class MigrationStatus(StrEnum):
    """Where one migration is, at its source (see status.py for the transitions)."""

    PREPARING = "PREPARING"
    COPYING = "COPYING"
    STOPPED = "STOPPED"
    COMMITTING = "COMMITTING"
    COMMITTED = "COMMITTED"
    ABORTED = "ABORTED"

    @property
    def is_final(self) -> bool:
        return self in (MigrationStatus.COMMITTED, MigrationStatus.ABORTED)
