"""Every migration's source pauses before its commit, logging `migration_fault_paused`:
the window in which a test kills the source or the destination."""

from __future__ import annotations

import asyncio

from services.common.logging import get_logger
from services.worker.migration.faults import FaultHooks

PAUSE_S = 6.0

log = get_logger(__name__)


class PauseBeforeCommit(FaultHooks):
    async def before_commit(self) -> None:
        log.warning("migration_fault_paused", point="before_commit")
        await asyncio.sleep(PAUSE_S)


migration_faults = PauseBeforeCommit()
