"""Live migration of running requests (Llumnix), both sides of the protocol.

    source (llumlet)                         destination
    ----------------                         -----------
    MigrationSource.migrate()
      PrepareMigration ───────────────────▶  reserve blocks under a lease
      stage 0..k  (request keeps decoding)
        MigrationStage ───────────────────▶  extend reservation, post receive
        kvtransport send: full blocks ════▶  write into reserved blocks
      last stage  (request suspended)
        MigrationStage + send: the rest ══▶
        CommitMigration(state) ───────────▶  import_request: decoding resumes here
      remove_request (blocks freed)

See docs/migration.md for the abort paths and the downtime argument.
"""

from services.worker.migration.config import MigrationConfig
from services.worker.migration.destination import MigrationDestination
from services.worker.migration.source import MigrationSource
from services.worker.migration.status import AbortReason, MigrationMode, MigrationStatus
from services.worker.migration.types import (
    CommitOffer,
    DestinationClient,
    MigrationResult,
    MigrationTarget,
    PrepareOffer,
    PrepareReply,
    RequestHandoff,
    StageOffer,
)

__all__ = [
    "AbortReason",
    "CommitOffer",
    "DestinationClient",
    "MigrationConfig",
    "MigrationDestination",
    "MigrationMode",
    "MigrationResult",
    "MigrationSource",
    "MigrationStatus",
    "MigrationTarget",
    "PrepareOffer",
    "PrepareReply",
    "RequestHandoff",
    "StageOffer",
]
