"""Stage 0's own join fails at a drop after the other member has joined (its layers
dropped, its requests handed to stage 0), as a migration reservation that slipped in
after PrepareJoin made it fail before the fix: the member must reload and take its
requests back, and stage 0 keep its own."""

from __future__ import annotations

import asyncio

from services.worker.kunserve.faults import GroupFaultHooks
from services.worker.kunserve.types import GroupError


class FailStage0Join(GroupFaultHooks):
    async def before_join(self, group_id: str, stage: int) -> None:
        if stage == 0:
            await asyncio.sleep(2.0)  # the other member's join completes meanwhile
            raise GroupError(f"injected: stage 0 cannot join {group_id}")


kunserve_faults = FailStage0Join()
