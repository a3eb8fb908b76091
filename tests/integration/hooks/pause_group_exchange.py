"""Every KunServe drop's KV exchange sends pause first, logging `kunserve_fault_paused`:
the window in which a test kills a member while requests wait for their KV."""

from __future__ import annotations

import asyncio

from services.common.logging import get_logger
from services.worker.kunserve.faults import GroupFaultHooks

PAUSE_S = 8.0

log = get_logger(__name__)


class PauseGroupExchange(GroupFaultHooks):
    async def before_exchange_send(self, spec) -> None:
        log.warning("kunserve_fault_paused", point="exchange", transfer_id=spec.transfer_id)
        await asyncio.sleep(PAUSE_S)


kunserve_faults = PauseGroupExchange()
