"""The scheduler's table of KunServe groups: validation, plans, and what reports say.

A group enters the table when an operator (or, later, a policy) asks for it, and
leaves when it is restored, when its drop fails, or when a member leaves the registry
(lease expired, deregistered: the surviving members dissolve the group on their own).

    DropGroup    plan() ─▶ DROPPING ─(stage 0 answers FormGroup)─▶ mark_serving() ─▶ SERVING
                    └────────(FormGroup failed)─▶ forget()
    RestoreGroup begin_restore() ─▶ RESTORING ─(DissolveGroup answered)─▶ end_restore(): gone
                                        └──(DissolveGroup failed)─▶ end_restore(): SERVING

Reports keep the table honest (`observe`): a restarted scheduler re-learns a group
once every stage of it has reported its group id and layer range, and a SERVING group
none of whose members reports it any more (it dissolved without us) is forgotten.

A plan keeps the stage order the caller gave; each stage keeps a contiguous layer
range (services.policies.groups.split_layers):

    instance_ids = [a, b, c, d], num_layers = 10
    stage:   0 (a)   1 (b)   2 (c)   3 (d)
    layers:  [0,3)   [3,6)   [6,8)   [8,10)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Sequence

from services.common.errors import FailedPreconditionError, NotFoundError, UnavailableError
from services.common.groups import GroupMember, GroupSpec, GroupStatus
from services.common.logging import get_logger
from services.common.messages import InstanceSpec
from services.policies import InstanceLoad
from services.policies.groups import split_layers
from services.scheduler.registry import InstanceRecord, InstanceRegistry

log = get_logger(__name__)

# InstanceSpec fields every member of a group must share.
MATCHING_FIELDS = ("model_id", "block_size", "kernels", "num_layers")


def plan_group(group_id: str, specs: Sequence[InstanceSpec]) -> GroupSpec:
    """The group of `specs` in stage order, DROPPING, its block counts still 0."""
    ranges = split_layers(specs[0].num_layers, len(specs))
    members = tuple(
        GroupMember(s.instance_id, s.address, s.transport_address, stage, start, end)
        for stage, (s, (start, end)) in enumerate(zip(specs, ranges, strict=True))
    )
    return GroupSpec(group_id, members, GroupStatus.DROPPING, block_size=specs[0].block_size)


class GroupTable:
    """Groups by id. Not thread-safe: used from the scheduler's event loop only."""

    def __init__(self, registry: InstanceRegistry) -> None:
        self.registry = registry
        self._groups: dict[str, GroupSpec] = {}
        self._next_index = 0
        # Ids restored through this scheduler: late reports never bring them back.
        self._dissolved: set[str] = set()
        # group id -> member -> the seq of its last report when the group began serving:
        # only younger reports can say that the group is gone.
        self._seq_at_serving: dict[str, dict[str, int]] = {}

    def __len__(self) -> int:
        return len(self._groups)

    def get(self, group_id: str) -> GroupSpec | None:
        return self._groups.get(group_id)

    def groups(self) -> list[GroupSpec]:
        """Every group, by id (group-2 before group-10)."""
        return [self._groups[g] for g in sorted(self._groups, key=lambda g: (len(g), g))]

    def group_of(self, instance_id: str) -> GroupSpec | None:
        for group in self._groups.values():
            if any(m.instance_id == instance_id for m in group.members):
                return group
        return None

    def member_ids(self) -> set[str]:
        return {m.instance_id for g in self._groups.values() for m in g.members}

    def annotate(self, loads: Sequence[InstanceLoad]) -> list[InstanceLoad]:
        """`loads` with the table's group and stage on members whose reports do not show
        them yet (a group still dropping), so the policies treat them as members."""
        stages = {
            m.instance_id: (g.group_id, m.stage) for g in self._groups.values() for m in g.members
        }
        annotated = []
        for ld in loads:
            if ld.instance_id in stages and not ld.group_id:
                group_id, stage = stages[ld.instance_id]
                ld = dataclasses.replace(ld, group_id=group_id, group_stage=stage)
            annotated.append(ld)
        return annotated

    # ---- DropGroup ------------------------------------------------------------------

    def plan(self, instance_ids: Sequence[str], draining: Collection[str] = ()) -> GroupSpec:
        """Validate a DropGroup request and keep its plan as DROPPING.

        Raises ValueError (a bad request), NotFoundError (an unknown instance) or
        FailedPreconditionError (an instance draining or already in a group).
        `draining`: instances the scaling loop drains that may not report it yet."""
        specs = [self._spec(i, draining) for i in self._check_ids(instance_ids)]
        first = specs[0]
        for spec in specs[1:]:
            for name in MATCHING_FIELDS:
                if getattr(spec, name) != getattr(first, name):
                    raise ValueError(
                        f"instance_ids: {spec.instance_id!r} has {name}="
                        f"{getattr(spec, name)!r} but {first.instance_id!r} has "
                        f"{getattr(first, name)!r}; the members of a group must match"
                    )
        if len(specs) > first.num_layers:
            raise ValueError(
                f"instance_ids: {len(specs)} stages exceed num_layers={first.num_layers} "
                f"(every stage keeps a layer)"
            )
        group = plan_group(self._new_id(), specs)
        self._groups[group.group_id] = group
        return group

    def _check_ids(self, instance_ids: Sequence[str]) -> Sequence[str]:
        if len(instance_ids) < 2:
            raise ValueError(
                f"instance_ids: a group needs 2 or more instances, got {len(instance_ids)}"
            )
        seen: set[str] = set()
        for index, instance_id in enumerate(instance_ids):
            if not instance_id:
                raise ValueError(f"instance_ids[{index}] must not be empty")
            if instance_id in seen:
                raise ValueError(f"instance_ids: {instance_id!r} is listed twice")
            seen.add(instance_id)
        return instance_ids

    def _spec(self, instance_id: str, draining: Collection[str]) -> InstanceSpec:
        record = self.registry.get(instance_id)
        if record is None:
            raise NotFoundError(f"instance {instance_id!r} is not registered")
        group = self.group_of(instance_id)
        group_id = group.group_id if group is not None else record.report.load.group_id
        if group_id:
            raise FailedPreconditionError(
                f"instance {instance_id!r} is already in group {group_id!r}"
            )
        if record.report.load.is_terminating or instance_id in draining:
            raise FailedPreconditionError(f"instance {instance_id!r} is draining")
        spec = record.spec
        if (spec.layer_start, spec.layer_end) != (0, spec.num_layers):
            raise FailedPreconditionError(
                f"instance {instance_id!r} holds layers [{spec.layer_start}, {spec.layer_end}) "
                f"of {spec.num_layers}, not all"
            )
        if not spec.transport_address:
            raise FailedPreconditionError(
                f"instance {instance_id!r} has no data-plane address (transport_address)"
            )
        return spec

    def _new_id(self) -> str:
        """group-<n>, skipping ids the table or any report (a group a restarted
        scheduler has not re-learned yet) already uses."""
        taken = set(self._groups) | {r.report.load.group_id for r in self.registry.records()}
        while True:
            group_id = f"group-{self._next_index}"
            self._next_index += 1
            if group_id not in taken and group_id not in self._dissolved:
                return group_id

    def mark_serving(
        self, group_id: str, num_group_blocks: int, num_blocks_before: int, freed_weight_bytes: int
    ) -> GroupSpec:
        """Stage 0 answered FormGroup: the group serves with these figures."""
        group = self._groups.get(group_id)
        if group is None:
            raise UnavailableError(
                f"group {group_id!r} was dissolved while dropping: a member left the registry"
            )
        group = dataclasses.replace(
            group,
            status=GroupStatus.SERVING,
            num_group_blocks=num_group_blocks,
            num_blocks_before=num_blocks_before,
            freed_weight_bytes=freed_weight_bytes,
        )
        self._keep_serving(group)
        return group

    def _keep_serving(self, group: GroupSpec) -> None:
        self._groups[group.group_id] = group
        self._seq_at_serving[group.group_id] = {
            m.instance_id: r.report.seq if (r := self.registry.get(m.instance_id)) else 0
            for m in group.members
        }

    def forget(self, group_id: str) -> GroupSpec | None:
        self._seq_at_serving.pop(group_id, None)
        return self._groups.pop(group_id, None)

    # ---- RestoreGroup ---------------------------------------------------------------

    def begin_restore(self, group_id: str) -> GroupSpec:
        """SERVING -> RESTORING; raises ValueError, NotFoundError or FailedPreconditionError."""
        if not group_id:
            raise ValueError("group_id must not be empty")
        group = self._groups.get(group_id)
        if group is None:
            raise NotFoundError(f"group {group_id!r} does not exist; known: {sorted(self._groups)}")
        if group.status is not GroupStatus.SERVING:
            raise FailedPreconditionError(
                f"group {group_id!r} is {group.status.value}; only a serving group can be restored"
            )
        group = group.with_status(GroupStatus.RESTORING)
        self._groups[group_id] = group
        return group

    def end_restore(self, group_id: str, is_dissolved: bool) -> None:
        """DissolveGroup answered (forget the group) or failed (it serves on)."""
        group = self._groups.get(group_id)
        if group is None:
            return
        if is_dissolved:
            self.forget(group_id)
            self._dissolved.add(group_id)
        else:
            self._groups[group_id] = group.with_status(GroupStatus.SERVING)

    # ---- registry events --------------------------------------------------------------

    def forget_members(self, instance_ids: Collection[str]) -> list[str]:
        """Instances left the registry: forget their groups (the survivors dissolve them
        on their own). Returns the forgotten group ids."""
        gone = [
            g.group_id
            for g in self._groups.values()
            if any(m.instance_id in instance_ids for m in g.members)
        ]
        for group_id in gone:
            self.forget(group_id)
            log.warning("group_forgotten", group_id=group_id, reason="a member left the registry")
        return gone

    def note_registered(self, instance_id: str) -> None:
        """A member (re-)registered: its sequence numbers start again."""
        for seqs in self._seq_at_serving.values():
            if instance_id in seqs:
                seqs[instance_id] = 0

    def observe(self, instance_id: str) -> None:
        """An instance reported: learn the group it reports, or forget a serving group
        none of whose members reports it any more."""
        record = self.registry.get(instance_id)
        if record is None:
            return
        group = self.group_of(instance_id)
        if group is not None and group.status is GroupStatus.SERVING and self._is_gone(group):
            self.forget(group.group_id)
            log.info("group_gone", group_id=group.group_id, reason="no member reports it")
        reported = record.report.load.group_id
        if reported and reported not in self._groups and reported not in self._dissolved:
            learned = self._learn(reported)
            if learned is not None:
                self._keep_serving(learned)
                log.info("group_learned", group_id=reported, num_stages=learned.num_stages)

    def _is_gone(self, group: GroupSpec) -> bool:
        """Every member sent a report younger than the group's start, and none of those
        names the group (a report sent before the drop may arrive after it)."""
        seqs = self._seq_at_serving.get(group.group_id, {})
        for member in group.members:
            record = self.registry.get(member.instance_id)
            if record is None or record.report.seq <= seqs.get(member.instance_id, 0):
                return False
            if record.report.load.group_id == group.group_id:
                return False
        return True

    def _learn(self, group_id: str) -> GroupSpec | None:
        """The group as its members' reports describe it, once every stage reported:
        stages 0..g-1, contiguous layer ranges from 0 to num_layers."""
        by_stage: dict[int, InstanceRecord] = {}
        for record in self.registry.records():
            if record.report.load.group_id != group_id:
                continue
            if record.report.load.group_stage in by_stage:
                return None  # two claim one stage: wait for the reports to settle
            by_stage[record.report.load.group_stage] = record
        if sorted(by_stage) != list(range(len(by_stage))) or len(by_stage) < 2:
            return None
        records = [by_stage[stage] for stage in range(len(by_stage))]
        members = tuple(
            GroupMember(
                r.spec.instance_id,
                r.spec.address,
                r.spec.transport_address,
                stage,
                r.report.layer_start,
                r.report.layer_end,
            )
            for stage, r in enumerate(records)
        )
        leader = records[0]
        if (members[0].layer_start, members[-1].layer_end) != (0, leader.spec.num_layers):
            return None
        if any(m.layer_start >= m.layer_end for m in members):
            return None
        try:
            return GroupSpec(
                group_id,
                members,
                GroupStatus.SERVING,
                num_group_blocks=leader.report.load.num_total_blocks,
                freed_weight_bytes=sum(r.report.freed_weight_bytes for r in records),
                block_size=leader.spec.block_size,
            )
        except ValueError:  # gaps between the reported ranges: not every stage is in
            return None
