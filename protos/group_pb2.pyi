from protos import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GroupStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GROUP_STATUS_UNSPECIFIED: _ClassVar[GroupStatus]
    GROUP_STATUS_DROPPING: _ClassVar[GroupStatus]
    GROUP_STATUS_SERVING: _ClassVar[GroupStatus]
    GROUP_STATUS_RESTORING: _ClassVar[GroupStatus]
GROUP_STATUS_UNSPECIFIED: GroupStatus
GROUP_STATUS_DROPPING: GroupStatus
GROUP_STATUS_SERVING: GroupStatus
GROUP_STATUS_RESTORING: GroupStatus

class GroupMember(_message.Message):
    __slots__ = ("instance_id", "address", "transport_address", "stage", "layer_start", "layer_end")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    address: str
    transport_address: bytes
    stage: int
    layer_start: int
    layer_end: int
    def __init__(self, instance_id: _Optional[str] = ..., address: _Optional[str] = ..., transport_address: _Optional[bytes] = ..., stage: _Optional[int] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ...) -> None: ...

class GroupState(_message.Message):
    __slots__ = ("group_id", "members", "status", "num_group_blocks", "num_blocks_before", "freed_weight_bytes", "block_size")
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    NUM_GROUP_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_BEFORE_FIELD_NUMBER: _ClassVar[int]
    FREED_WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    members: _containers.RepeatedCompositeFieldContainer[GroupMember]
    status: GroupStatus
    num_group_blocks: int
    num_blocks_before: int
    freed_weight_bytes: int
    block_size: int
    def __init__(self, group_id: _Optional[str] = ..., members: _Optional[_Iterable[_Union[GroupMember, _Mapping]]] = ..., status: _Optional[_Union[GroupStatus, str]] = ..., num_group_blocks: _Optional[int] = ..., num_blocks_before: _Optional[int] = ..., freed_weight_bytes: _Optional[int] = ..., block_size: _Optional[int] = ...) -> None: ...

class GroupRequest(_message.Message):
    __slots__ = ("state", "block_ids", "group_block_ids")
    STATE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    GROUP_BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    state: _common_pb2.RequestState
    block_ids: _containers.RepeatedScalarFieldContainer[int]
    group_block_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, state: _Optional[_Union[_common_pb2.RequestState, _Mapping]] = ..., block_ids: _Optional[_Iterable[int]] = ..., group_block_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class KVTransfer(_message.Message):
    __slots__ = ("transfer_id", "request_id", "from_stage", "to_stage", "src_block_ids", "dst_block_ids", "layer_start", "layer_end")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_STAGE_FIELD_NUMBER: _ClassVar[int]
    TO_STAGE_FIELD_NUMBER: _ClassVar[int]
    SRC_BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    DST_BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    request_id: str
    from_stage: int
    to_stage: int
    src_block_ids: _containers.RepeatedScalarFieldContainer[int]
    dst_block_ids: _containers.RepeatedScalarFieldContainer[int]
    layer_start: int
    layer_end: int
    def __init__(self, transfer_id: _Optional[str] = ..., request_id: _Optional[str] = ..., from_stage: _Optional[int] = ..., to_stage: _Optional[int] = ..., src_block_ids: _Optional[_Iterable[int]] = ..., dst_block_ids: _Optional[_Iterable[int]] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ...) -> None: ...

class FormGroupRequest(_message.Message):
    __slots__ = ("group",)
    GROUP_FIELD_NUMBER: _ClassVar[int]
    group: GroupState
    def __init__(self, group: _Optional[_Union[GroupState, _Mapping]] = ...) -> None: ...

class FormGroupResponse(_message.Message):
    __slots__ = ("group", "num_exchanging_requests", "drop_ms")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    NUM_EXCHANGING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    DROP_MS_FIELD_NUMBER: _ClassVar[int]
    group: GroupState
    num_exchanging_requests: int
    drop_ms: float
    def __init__(self, group: _Optional[_Union[GroupState, _Mapping]] = ..., num_exchanging_requests: _Optional[int] = ..., drop_ms: _Optional[float] = ...) -> None: ...

class DissolveGroupRequest(_message.Message):
    __slots__ = ("group_id",)
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    def __init__(self, group_id: _Optional[str] = ...) -> None: ...

class DissolveGroupResponse(_message.Message):
    __slots__ = ("num_requests_moved", "num_preempted", "restore_ms")
    NUM_REQUESTS_MOVED_FIELD_NUMBER: _ClassVar[int]
    NUM_PREEMPTED_FIELD_NUMBER: _ClassVar[int]
    RESTORE_MS_FIELD_NUMBER: _ClassVar[int]
    num_requests_moved: int
    num_preempted: int
    restore_ms: float
    def __init__(self, num_requests_moved: _Optional[int] = ..., num_preempted: _Optional[int] = ..., restore_ms: _Optional[float] = ...) -> None: ...

class PrepareJoinRequest(_message.Message):
    __slots__ = ("group",)
    GROUP_FIELD_NUMBER: _ClassVar[int]
    group: GroupState
    def __init__(self, group: _Optional[_Union[GroupState, _Mapping]] = ...) -> None: ...

class PrepareJoinResponse(_message.Message):
    __slots__ = ("accepted", "reason", "num_blocks", "num_group_blocks_possible")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_GROUP_BLOCKS_POSSIBLE_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    reason: str
    num_blocks: int
    num_group_blocks_possible: int
    def __init__(self, accepted: _Optional[bool] = ..., reason: _Optional[str] = ..., num_blocks: _Optional[int] = ..., num_group_blocks_possible: _Optional[int] = ...) -> None: ...

class JoinGroupRequest(_message.Message):
    __slots__ = ("group", "block_offset", "epoch")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    BLOCK_OFFSET_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    group: GroupState
    block_offset: int
    epoch: str
    def __init__(self, group: _Optional[_Union[GroupState, _Mapping]] = ..., block_offset: _Optional[int] = ..., epoch: _Optional[str] = ...) -> None: ...

class JoinGroupResponse(_message.Message):
    __slots__ = ("requests", "freed_weight_bytes")
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    FREED_WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[GroupRequest]
    freed_weight_bytes: int
    def __init__(self, requests: _Optional[_Iterable[_Union[GroupRequest, _Mapping]]] = ..., freed_weight_bytes: _Optional[int] = ...) -> None: ...

class ExchangeRequest(_message.Message):
    __slots__ = ("group_id", "sends", "receives")
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    SENDS_FIELD_NUMBER: _ClassVar[int]
    RECEIVES_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    sends: _containers.RepeatedCompositeFieldContainer[KVTransfer]
    receives: _containers.RepeatedCompositeFieldContainer[KVTransfer]
    def __init__(self, group_id: _Optional[str] = ..., sends: _Optional[_Iterable[_Union[KVTransfer, _Mapping]]] = ..., receives: _Optional[_Iterable[_Union[KVTransfer, _Mapping]]] = ...) -> None: ...

class ExchangeResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ExchangeDoneRequest(_message.Message):
    __slots__ = ("group_id", "request_id", "stage", "error")
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    request_id: str
    stage: int
    error: str
    def __init__(self, group_id: _Optional[str] = ..., request_id: _Optional[str] = ..., stage: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class ExchangeDoneResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LeaveGroupRequest(_message.Message):
    __slots__ = ("group_id", "exchange", "requests")
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    EXCHANGE_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    exchange: ExchangeRequest
    requests: _containers.RepeatedCompositeFieldContainer[GroupRequest]
    def __init__(self, group_id: _Optional[str] = ..., exchange: _Optional[_Union[ExchangeRequest, _Mapping]] = ..., requests: _Optional[_Iterable[_Union[GroupRequest, _Mapping]]] = ...) -> None: ...

class LeaveGroupResponse(_message.Message):
    __slots__ = ("restored_weight_bytes",)
    RESTORED_WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    restored_weight_bytes: int
    def __init__(self, restored_weight_bytes: _Optional[int] = ...) -> None: ...

class AbortGroupRequest(_message.Message):
    __slots__ = ("group_id", "reason")
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    reason: str
    def __init__(self, group_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class AbortGroupResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
