"""A DestinationClient that calls a MigrationDestination in the same process.

Used where both engines live in one process (benchmarks, protocol tests); workers use
services.worker.migration.grpc_client over the network.
"""

from __future__ import annotations

from services.worker.migration.destination import MigrationDestination
from services.worker.migration.types import CommitOffer, PrepareOffer, PrepareReply, StageOffer


class LocalDestinationClient:
    def __init__(self, destination: MigrationDestination) -> None:
        self.destination = destination

    async def prepare(self, offer: PrepareOffer) -> PrepareReply:
        return await self.destination.prepare(offer)

    async def stage(self, offer: StageOffer) -> tuple[bool, str]:
        return await self.destination.stage(offer)

    async def commit(self, offer: CommitOffer) -> tuple[bool, str]:
        return await self.destination.commit(offer)

    async def abort(self, migration_id: str, reason: str) -> bool:
        return await self.destination.abort(migration_id, reason)
