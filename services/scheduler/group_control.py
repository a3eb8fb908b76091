"""Dropping and restoring KunServe groups: the one code path behind the DropGroup /
RestoreGroup RPCs and the group loop (services/scheduler/control.py).

    drop_group(ids)       GroupTable.plan (validate, DROPPING) -> Worker.FormGroup on
                          stage 0 -> mark_serving (SERVING); a failed call forgets the plan
    restore_group(id)     GroupTable.begin_restore (RESTORING) -> Worker.DissolveGroup on
                          stage 0 -> end_restore (gone; or SERVING again if it failed)

Errors are ServiceErrors / ValueError, which the servicer's interceptor maps to gRPC
codes and the loop logs. The table's states keep two operations off one group or
instance whoever asks: a plan refuses members of any group (dropping, serving or
restoring) and only a SERVING group can begin a restore.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Collection
from dataclasses import dataclass

from opentelemetry import trace

from services.common.groups import GroupSpec
from services.common.logging import get_logger
from services.scheduler.groups import GroupTable
from services.scheduler.worker_client import DissolvedGroup, FormedGroup, WorkerClient

log = get_logger(__name__)
tracer = trace.get_tracer("llmesh.scheduler")


@dataclass(frozen=True)
class DroppedGroup:
    """A group that serves: the table's spec (SERVING, with its figures) and stage 0's
    answer."""

    group: GroupSpec
    formed: FormedGroup


class GroupControl:
    """Forms and dissolves groups through their stage 0, keeping the table in step."""

    def __init__(
        self,
        table: GroupTable,
        workers: WorkerClient,
        draining: Callable[[], Collection[str]] = tuple,
    ) -> None:
        self.table = table
        self.workers = workers
        # Instances the scaling loop drains (their reports may not say so yet).
        self.draining = draining
        # (operation "drop" | "restore", outcome "ok" | "failed") -> count, for the metrics.
        self.outcomes: collections.Counter[tuple[str, str]] = collections.Counter()

    async def drop_group(self, instance_ids: list[str]) -> DroppedGroup:
        """Plan the group (stage order as given), have stage 0 form it, keep it once it
        serves. Raises ValueError / NotFoundError / FailedPreconditionError for a plan
        the table refuses, the worker call's ServiceError otherwise."""
        with tracer.start_as_current_span("scheduler.drop_group") as span:
            group = self.table.plan(instance_ids, self.draining())
            span.set_attribute("llmesh.group_id", group.group_id)
            span.set_attribute("llmesh.num_stages", group.num_stages)
            log.info(
                "group_dropping",
                group_id=group.group_id,
                members=[f"{m.instance_id}[{m.layer_start},{m.layer_end})" for m in group.members],
            )
            try:
                formed = await self.workers.form_group(group)
            except Exception as exc:
                self.outcomes["drop", "failed"] += 1
                self.table.forget(group.group_id)
                log.warning("group_drop_failed", group_id=group.group_id, error=str(exc))
                raise
            self.outcomes["drop", "ok"] += 1
            group = self.table.mark_serving(
                group.group_id,
                formed.num_group_blocks,
                formed.num_blocks_before,
                formed.freed_weight_bytes,
            )
            log.info(
                "group_serving",
                group_id=group.group_id,
                num_group_blocks=group.num_group_blocks,
                num_blocks_before=group.num_blocks_before,
                freed_weight_bytes=group.freed_weight_bytes,
                num_exchanging_requests=formed.num_exchanging_requests,
                drop_ms=round(formed.drop_ms, 3),
            )
            return DroppedGroup(group, formed)

    async def restore_group(self, group_id: str) -> DissolvedGroup:
        """Have the group's stage 0 restore every member, then forget the group. Raises
        ValueError / NotFoundError / FailedPreconditionError for a group that cannot
        begin a restore, the worker call's ServiceError otherwise (the group serves on)."""
        with tracer.start_as_current_span("scheduler.restore_group") as span:
            group = self.table.begin_restore(group_id)
            span.set_attribute("llmesh.group_id", group.group_id)
            log.info("group_restoring", group_id=group.group_id)
            try:
                dissolved = await self.workers.dissolve_group(group)
            except Exception as exc:
                self.outcomes["restore", "failed"] += 1
                self.table.end_restore(group.group_id, is_dissolved=False)
                log.warning("group_restore_failed", group_id=group.group_id, error=str(exc))
                raise
            self.outcomes["restore", "ok"] += 1
            self.table.end_restore(group.group_id, is_dissolved=True)
            log.info(
                "group_restored",
                group_id=group.group_id,
                num_requests_moved=dissolved.num_requests_moved,
                num_preempted=dissolved.num_preempted,
                restore_ms=round(dissolved.restore_ms, 3),
            )
            return dissolved
