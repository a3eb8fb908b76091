from protos import common_pb2 as _common_pb2
from protos import group_pb2 as _group_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MigrationMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MIGRATION_MODE_UNSPECIFIED: _ClassVar[MigrationMode]
    MIGRATION_MODE_LIVE: _ClassVar[MigrationMode]
    MIGRATION_MODE_BLOCKING_COPY: _ClassVar[MigrationMode]
    MIGRATION_MODE_RECOMPUTE: _ClassVar[MigrationMode]

class MigrationStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MIGRATION_STATUS_UNSPECIFIED: _ClassVar[MigrationStatus]
    MIGRATION_STATUS_PREPARING: _ClassVar[MigrationStatus]
    MIGRATION_STATUS_COPYING: _ClassVar[MigrationStatus]
    MIGRATION_STATUS_STOPPED: _ClassVar[MigrationStatus]
    MIGRATION_STATUS_COMMITTING: _ClassVar[MigrationStatus]
    MIGRATION_STATUS_COMMITTED: _ClassVar[MigrationStatus]
    MIGRATION_STATUS_ABORTED: _ClassVar[MigrationStatus]
MIGRATION_MODE_UNSPECIFIED: MigrationMode
MIGRATION_MODE_LIVE: MigrationMode
MIGRATION_MODE_BLOCKING_COPY: MigrationMode
MIGRATION_MODE_RECOMPUTE: MigrationMode
MIGRATION_STATUS_UNSPECIFIED: MigrationStatus
MIGRATION_STATUS_PREPARING: MigrationStatus
MIGRATION_STATUS_COPYING: MigrationStatus
MIGRATION_STATUS_STOPPED: MigrationStatus
MIGRATION_STATUS_COMMITTING: MigrationStatus
MIGRATION_STATUS_COMMITTED: MigrationStatus
MIGRATION_STATUS_ABORTED: MigrationStatus

class SubmitRequest(_message.Message):
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: _common_pb2.RequestState
    def __init__(self, state: _Optional[_Union[_common_pb2.RequestState, _Mapping]] = ...) -> None: ...

class SubmitResponse(_message.Message):
    __slots__ = ("instance_id",)
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    def __init__(self, instance_id: _Optional[str] = ...) -> None: ...

class WorkerAbortRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class WorkerAbortResponse(_message.Message):
    __slots__ = ("aborted",)
    ABORTED_FIELD_NUMBER: _ClassVar[int]
    aborted: bool
    def __init__(self, aborted: _Optional[bool] = ...) -> None: ...

class RehomeRequest(_message.Message):
    __slots__ = ("request_id", "owner_address", "next_index")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    OWNER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    NEXT_INDEX_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    owner_address: str
    next_index: int
    def __init__(self, request_id: _Optional[str] = ..., owner_address: _Optional[str] = ..., next_index: _Optional[int] = ...) -> None: ...

class RehomeResponse(_message.Message):
    __slots__ = ("found", "state", "finish_reason", "instance_id")
    FOUND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    found: bool
    state: _common_pb2.RequestState
    finish_reason: _common_pb2.FinishReason
    instance_id: str
    def __init__(self, found: _Optional[bool] = ..., state: _Optional[_Union[_common_pb2.RequestState, _Mapping]] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., instance_id: _Optional[str] = ...) -> None: ...

class GetLoadRequest(_message.Message):
    __slots__ = ("check_integrity",)
    CHECK_INTEGRITY_FIELD_NUMBER: _ClassVar[int]
    check_integrity: bool
    def __init__(self, check_integrity: _Optional[bool] = ...) -> None: ...

class MigrateOutRequest(_message.Message):
    __slots__ = ("dst_instance_id", "dst_address", "dst_transport_address", "request_id", "num_requests", "wait", "mode")
    DST_INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    DST_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    DST_TRANSPORT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    dst_instance_id: str
    dst_address: str
    dst_transport_address: bytes
    request_id: str
    num_requests: int
    wait: bool
    mode: MigrationMode
    def __init__(self, dst_instance_id: _Optional[str] = ..., dst_address: _Optional[str] = ..., dst_transport_address: _Optional[bytes] = ..., request_id: _Optional[str] = ..., num_requests: _Optional[int] = ..., wait: _Optional[bool] = ..., mode: _Optional[_Union[MigrationMode, str]] = ...) -> None: ...

class MigrateOutResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[MigrationResult]
    def __init__(self, results: _Optional[_Iterable[_Union[MigrationResult, _Mapping]]] = ...) -> None: ...

class MigrationResult(_message.Message):
    __slots__ = ("migration_id", "request_id", "status", "reason", "num_stages", "num_blocks", "downtime_ms", "num_bytes", "duration_ms")
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    NUM_STAGES_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    DOWNTIME_MS_FIELD_NUMBER: _ClassVar[int]
    NUM_BYTES_FIELD_NUMBER: _ClassVar[int]
    DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    request_id: str
    status: MigrationStatus
    reason: str
    num_stages: int
    num_blocks: int
    downtime_ms: float
    num_bytes: int
    duration_ms: float
    def __init__(self, migration_id: _Optional[str] = ..., request_id: _Optional[str] = ..., status: _Optional[_Union[MigrationStatus, str]] = ..., reason: _Optional[str] = ..., num_stages: _Optional[int] = ..., num_blocks: _Optional[int] = ..., downtime_ms: _Optional[float] = ..., num_bytes: _Optional[int] = ..., duration_ms: _Optional[float] = ...) -> None: ...

class PrepareMigrationRequest(_message.Message):
    __slots__ = ("migration_id", "request_id", "src_instance_id", "src_transport_address", "num_blocks", "lease_ms", "num_tokens", "trace_context", "kernels", "device")
    class TraceContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SRC_INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    SRC_TRANSPORT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    KERNELS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    request_id: str
    src_instance_id: str
    src_transport_address: bytes
    num_blocks: int
    lease_ms: int
    num_tokens: int
    trace_context: _containers.ScalarMap[str, str]
    kernels: _common_pb2.KernelBackend
    device: str
    def __init__(self, migration_id: _Optional[str] = ..., request_id: _Optional[str] = ..., src_instance_id: _Optional[str] = ..., src_transport_address: _Optional[bytes] = ..., num_blocks: _Optional[int] = ..., lease_ms: _Optional[int] = ..., num_tokens: _Optional[int] = ..., trace_context: _Optional[_Mapping[str, str]] = ..., kernels: _Optional[_Union[_common_pb2.KernelBackend, str]] = ..., device: _Optional[str] = ...) -> None: ...

class PrepareMigrationResponse(_message.Message):
    __slots__ = ("accepted", "reason", "kv_block_nbytes")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCK_NBYTES_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    reason: str
    kv_block_nbytes: int
    def __init__(self, accepted: _Optional[bool] = ..., reason: _Optional[str] = ..., kv_block_nbytes: _Optional[int] = ...) -> None: ...

class MigrationStageRequest(_message.Message):
    __slots__ = ("migration_id", "stage_index", "first_block_index", "num_blocks", "transfer_id", "is_last")
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    STAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    FIRST_BLOCK_INDEX_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    IS_LAST_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    stage_index: int
    first_block_index: int
    num_blocks: int
    transfer_id: str
    is_last: bool
    def __init__(self, migration_id: _Optional[str] = ..., stage_index: _Optional[int] = ..., first_block_index: _Optional[int] = ..., num_blocks: _Optional[int] = ..., transfer_id: _Optional[str] = ..., is_last: _Optional[bool] = ...) -> None: ...

class MigrationStageResponse(_message.Message):
    __slots__ = ("ready", "reason")
    READY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ready: bool
    reason: str
    def __init__(self, ready: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class CommitMigrationRequest(_message.Message):
    __slots__ = ("migration_id", "state", "num_blocks")
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    state: _common_pb2.RequestState
    num_blocks: int
    def __init__(self, migration_id: _Optional[str] = ..., state: _Optional[_Union[_common_pb2.RequestState, _Mapping]] = ..., num_blocks: _Optional[int] = ...) -> None: ...

class CommitMigrationResponse(_message.Message):
    __slots__ = ("committed", "reason")
    COMMITTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    committed: bool
    reason: str
    def __init__(self, committed: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class AbortMigrationRequest(_message.Message):
    __slots__ = ("migration_id", "reason")
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    reason: str
    def __init__(self, migration_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class AbortMigrationResponse(_message.Message):
    __slots__ = ("freed",)
    FREED_FIELD_NUMBER: _ClassVar[int]
    freed: bool
    def __init__(self, freed: _Optional[bool] = ...) -> None: ...
