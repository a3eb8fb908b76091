"""Every migration's source pauses once it built the handoff (the request's owner
gateway is fixed in it), before its commit, logging `migration_fault_paused`: the
window in which a gateway failover re-homes the request on the source."""

from __future__ import annotations

import asyncio

from services.common.logging import get_logger
from services.worker.migration.faults import FaultHooks

PAUSE_S = 8.0  # a gateway restarts and the client resumes meanwhile

log = get_logger(__name__)


class PauseAfterHandoff(FaultHooks):
    async def after_handoff(self) -> None:
        log.warning("migration_fault_paused", point="after_handoff")
        await asyncio.sleep(PAUSE_S)


migration_faults = PauseAfterHandoff()
