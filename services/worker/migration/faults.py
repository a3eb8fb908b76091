"""Where tests reach into a running migration: fault hooks the source calls.

The protocol code calls these at fixed points and does nothing else about faults; the
default hooks do nothing. Integration tests install a subclass in worker processes
through `LLMESH_TEST_HOOKS` (a module under tests/ defining `migration_faults`; see
services/worker/__main__.py), unit tests pass one to `MigrationSource` directly.
"""

from __future__ import annotations


class FaultHooks:
    """No faults: every hook returns at once and changes nothing."""

    async def before_stage(self, stage_index: int) -> None:
        """Before stage `stage_index`'s offer is sent (the last stage included)."""

    async def before_commit(self) -> None:
        """After the last stage's bytes were delivered, before CommitMigration."""

    async def after_handoff(self) -> None:
        """After the handoff (the request's owner gateway among it) was built, before
        CommitMigration is sent: the window a Rehome on the source must wait out."""

    def transfer_id(self, stage_index: int, transfer_id: str) -> str:
        """The data-plane id stage `stage_index`'s bytes are sent under (the offer names
        `transfer_id`: anything else leaves the destination waiting for them)."""
        return transfer_id


NO_FAULTS = FaultHooks()
