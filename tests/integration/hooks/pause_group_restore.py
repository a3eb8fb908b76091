"""Every KunServe restore pauses on each member before its weight and KV transfers,
logging `kunserve_fault_paused`: the window in which a test kills a member mid-restore."""

from __future__ import annotations

import asyncio

from services.common.logging import get_logger
from services.worker.kunserve.faults import GroupFaultHooks

PAUSE_S = 8.0

log = get_logger(__name__)


class PauseGroupRestore(GroupFaultHooks):
    async def before_restore_transfers(self, group_id: str) -> None:
        log.warning("kunserve_fault_paused", point="restore", group_id=group_id)
        await asyncio.sleep(PAUSE_S)


kunserve_faults = PauseGroupRestore()
