"""Where tests reach into a running KunServe group: fault hooks the members call.

The group code calls these at fixed points and does nothing else about faults; the
default hooks do nothing. Integration tests install a subclass in worker processes
through `LLMESH_TEST_HOOKS` (a module under tests/ defining `kunserve_faults`; see
services/worker/__main__.py); unit tests pass one to `GroupMembership` directly.
"""

from __future__ import annotations

from services.common.groups import KVTransferSpec


class GroupFaultHooks:
    """No faults: every hook returns at once."""

    async def before_join(self, group_id: str, stage: int) -> None:
        """At a drop, when a member is told to join (JoinGroup), before its engine
        exports anything; raising fails that member's join."""

    async def before_exchange(self, group_id: str, stage: int) -> None:
        """At a drop, when a member is told to start its KV exchange (stage 0 tells
        itself in-process, the others over gRPC)."""

    async def before_exchange_send(self, spec: KVTransferSpec) -> None:
        """Before a member sends a request's KV slices to another member at a drop."""

    async def before_restore_transfers(self, group_id: str) -> None:
        """At a restore, before a member sends and receives weights and KV."""

    async def after_restore_import(self, group_id: str) -> None:
        """At a restore, once a member holds every layer again and its engine runs the
        requests that went home there (it may already be stepping them)."""


NO_GROUP_FAULTS = GroupFaultHooks()
