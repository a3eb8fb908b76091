"""A member other than stage 0 dies (SIGKILL, itself) the moment it is told to start its
KV exchange at a drop: it joined the group, so its layers are gone, and stage 0 has
adopted its requests, but no KV has moved yet."""

from __future__ import annotations

import os
import signal

from services.worker.kunserve.faults import GroupFaultHooks


class KillAtExchangeStart(GroupFaultHooks):
    async def before_exchange(self, group_id: str, stage: int) -> None:
        if stage > 0:
            os.kill(os.getpid(), signal.SIGKILL)


kunserve_faults = KillAtExchangeStart()
