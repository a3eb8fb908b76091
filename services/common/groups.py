"""Plain dataclasses of KunServe groups (protos/group.proto), shared by the scheduler,
the workers and the CLI. Servicers convert at the edge (services.common.convert_groups).

A group's life (GroupStatus), at the scheduler and at stage 0:

    DROPPING --(every member dropped; capacity usable)--> SERVING
    SERVING  --(DissolveGroup)--> RESTORING --(every member alone again)--> (gone)
    DROPPING / SERVING / RESTORING --(a member died)--> (gone: survivors reload)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace


class GroupStatus(enum.Enum):
    DROPPING = "dropping"
    SERVING = "serving"
    RESTORING = "restoring"


@dataclass(frozen=True)
class GroupMember:
    """One member: where it is and which layers it keeps."""

    instance_id: str
    address: str  # worker gRPC host:port
    transport_address: bytes  # data-plane address
    stage: int  # 0 schedules for the group
    layer_start: int
    layer_end: int

    @property
    def num_layers(self) -> int:
        return self.layer_end - self.layer_start


@dataclass(frozen=True)
class GroupSpec:
    """A group: its members in stage order and its pool."""

    group_id: str
    members: tuple[GroupMember, ...]
    status: GroupStatus = GroupStatus.DROPPING
    num_group_blocks: int = 0  # blocks of the group pool (0 until stage 0 sized it)
    num_blocks_before: int = 0  # the members' pools before the drop, summed
    freed_weight_bytes: int = 0
    block_size: int = 16

    def __post_init__(self) -> None:
        stages = [m.stage for m in self.members]
        if stages != list(range(len(self.members))):
            raise ValueError(f"group {self.group_id}: members must be stages 0..g-1, got {stages}")
        if len(self.members) < 2:
            raise ValueError(f"group {self.group_id}: a group needs 2 or more members")
        for a, b in zip(self.members, self.members[1:], strict=False):
            if a.layer_end != b.layer_start:
                raise ValueError(
                    f"group {self.group_id}: stage {b.stage} starts at layer {b.layer_start}, "
                    f"stage {a.stage} ends at {a.layer_end}"
                )

    @property
    def num_stages(self) -> int:
        return len(self.members)

    @property
    def leader(self) -> GroupMember:
        return self.members[0]

    def member(self, instance_id: str) -> GroupMember:
        for m in self.members:
            if m.instance_id == instance_id:
                return m
        raise KeyError(f"{instance_id!r} is not a member of group {self.group_id}")

    def with_status(self, status: GroupStatus) -> GroupSpec:
        return replace(self, status=status)


@dataclass(frozen=True)
class KVTransferSpec:
    """One KV transfer between members: a request's blocks for layers [start, end)."""

    transfer_id: str
    request_id: str
    from_stage: int
    to_stage: int
    src_block_ids: tuple[int, ...]
    dst_block_ids: tuple[int, ...]
    layer_start: int
    layer_end: int


@dataclass(frozen=True)
class ExchangePlan:
    """What one member sends and receives in a KV exchange (drop or restore)."""

    group_id: str
    sends: tuple[KVTransferSpec, ...] = field(default=())
    receives: tuple[KVTransferSpec, ...] = field(default=())
