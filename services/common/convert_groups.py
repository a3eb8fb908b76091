"""protobuf <-> dataclass conversions of KunServe groups (protos/group.proto)."""

from __future__ import annotations

from protos import group_pb2
from services.common.groups import (
    ExchangePlan,
    GroupMember,
    GroupSpec,
    GroupStatus,
    KVTransferSpec,
)

_STATUS_TO_PROTO = {
    GroupStatus.DROPPING: group_pb2.GROUP_STATUS_DROPPING,
    GroupStatus.SERVING: group_pb2.GROUP_STATUS_SERVING,
    GroupStatus.RESTORING: group_pb2.GROUP_STATUS_RESTORING,
}
_STATUS_FROM_PROTO = {v: k for k, v in _STATUS_TO_PROTO.items()}


def group_to_proto(group: GroupSpec) -> group_pb2.GroupState:
    return group_pb2.GroupState(
        group_id=group.group_id,
        members=[
            group_pb2.GroupMember(
                instance_id=m.instance_id,
                address=m.address,
                transport_address=m.transport_address,
                stage=m.stage,
                layer_start=m.layer_start,
                layer_end=m.layer_end,
            )
            for m in group.members
        ],
        status=_STATUS_TO_PROTO[group.status],
        num_group_blocks=group.num_group_blocks,
        num_blocks_before=group.num_blocks_before,
        freed_weight_bytes=group.freed_weight_bytes,
        block_size=group.block_size,
    )


def group_from_proto(state: group_pb2.GroupState) -> GroupSpec:
    """Raises ValueError naming the field for a malformed group."""
    if not state.group_id:
        raise ValueError("group.group_id must not be empty")
    if state.status not in _STATUS_FROM_PROTO:
        raise ValueError(f"group.status={state.status} is not a known GroupStatus")
    if state.block_size <= 0:
        raise ValueError(f"group.block_size={state.block_size} must be > 0")
    members = tuple(
        GroupMember(
            m.instance_id,
            m.address,
            bytes(m.transport_address),
            m.stage,
            m.layer_start,
            m.layer_end,
        )  # fmt: skip
        for m in state.members
    )
    for m in members:
        if not m.instance_id or not m.address:
            raise ValueError("group.members[].instance_id and .address must not be empty")
        if not 0 <= m.layer_start < m.layer_end:
            raise ValueError(
                f"group.members[{m.stage}] layers [{m.layer_start}, {m.layer_end}) are empty"
            )
    return GroupSpec(
        state.group_id,
        members,
        _STATUS_FROM_PROTO[state.status],
        state.num_group_blocks,
        state.num_blocks_before,
        state.freed_weight_bytes,
        state.block_size,
    )


def transfer_to_proto(t: KVTransferSpec) -> group_pb2.KVTransfer:
    return group_pb2.KVTransfer(
        transfer_id=t.transfer_id,
        request_id=t.request_id,
        from_stage=t.from_stage,
        to_stage=t.to_stage,
        src_block_ids=list(t.src_block_ids),
        dst_block_ids=list(t.dst_block_ids),
        layer_start=t.layer_start,
        layer_end=t.layer_end,
    )


def transfer_from_proto(t: group_pb2.KVTransfer) -> KVTransferSpec:
    if len(t.src_block_ids) != len(t.dst_block_ids):
        raise ValueError(
            f"transfer {t.transfer_id}: {len(t.src_block_ids)} src_block_ids but "
            f"{len(t.dst_block_ids)} dst_block_ids"
        )
    if not t.transfer_id or not t.layer_start < t.layer_end:
        raise ValueError(f"transfer {t.transfer_id!r}: empty id or layer range")
    return KVTransferSpec(
        t.transfer_id,
        t.request_id,
        t.from_stage,
        t.to_stage,
        tuple(t.src_block_ids),
        tuple(t.dst_block_ids),
        t.layer_start,
        t.layer_end,
    )


def exchange_to_proto(plan: ExchangePlan) -> group_pb2.ExchangeRequest:
    return group_pb2.ExchangeRequest(
        group_id=plan.group_id,
        sends=[transfer_to_proto(t) for t in plan.sends],
        receives=[transfer_to_proto(t) for t in plan.receives],
    )


def exchange_from_proto(request: group_pb2.ExchangeRequest) -> ExchangePlan:
    return ExchangePlan(
        request.group_id,
        tuple(transfer_from_proto(t) for t in request.sends),
        tuple(transfer_from_proto(t) for t in request.receives),
    )
