"""Messages between the members of a group, as the worker's KunServe code sees them
(servicers convert protobuf at the edge: kunserve/client.py and the worker servicer)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from services.common.errors import FailedPreconditionError
from services.worker.migration import RequestHandoff


class Role(enum.Enum):
    """This worker's part in a group.

    ALONE -> JOINING (PrepareJoin) -> LEADER | STAGE (JoinGroup) -> LEAVING (LeaveGroup)
    -> ALONE; JOINING -> ALONE when the drop is called off; any -> ALONE on AbortGroup
    or when a member dies.
    """

    ALONE = "alone"
    JOINING = "joining"
    LEADER = "leader"  # stage 0: schedules for the group
    STAGE = "stage"  # stage 1 .. g-1: runs what stage 0 sends
    LEAVING = "leaving"


@dataclass(frozen=True)
class PrepareReply:
    accepted: bool
    reason: str = ""
    num_blocks: int = 0  # pool now, in blocks of all layers
    num_group_blocks_possible: int = 0  # group blocks it holds keeping only its layers


@dataclass(frozen=True)
class HandedRequest:
    """A request handed to another member, with its block table there (empty: waiting).
    At a restore, `group_block_ids` says where its KV is in the group pool."""

    handoff: RequestHandoff
    block_ids: tuple[int, ...] = ()
    group_block_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class JoinReply:
    requests: tuple[HandedRequest, ...]
    freed_weight_bytes: int


class GroupError(FailedPreconditionError):
    """A group operation cannot run or failed; the message says which member and why
    (FAILED_PRECONDITION over gRPC)."""
