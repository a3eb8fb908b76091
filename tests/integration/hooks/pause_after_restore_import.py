"""Every KunServe restore pauses on each member for PAUSE_S once its engine runs the
requests that went home there, before the member's last bookkeeping: the engine steps
them meanwhile, so their first tokens there must already reach their gateways."""

from __future__ import annotations

import asyncio

from services.common.logging import get_logger
from services.worker.kunserve.faults import GroupFaultHooks

PAUSE_S = 0.5

log = get_logger(__name__)


class PauseAfterRestoreImport(GroupFaultHooks):
    async def after_restore_import(self, group_id: str) -> None:
        log.warning("kunserve_fault_paused", point="after_restore_import", group_id=group_id)
        await asyncio.sleep(PAUSE_S)


kunserve_faults = PauseAfterRestoreImport()
