from protos import common_pb2 as _common_pb2
from protos import group_pb2 as _group_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RegisterInstanceRequest(_message.Message):
    __slots__ = ("info",)
    INFO_FIELD_NUMBER: _ClassVar[int]
    info: _common_pb2.InstanceInfo
    def __init__(self, info: _Optional[_Union[_common_pb2.InstanceInfo, _Mapping]] = ...) -> None: ...

class RegisterInstanceResponse(_message.Message):
    __slots__ = ("lease_ms", "report_interval_ms")
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    REPORT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    lease_ms: int
    report_interval_ms: int
    def __init__(self, lease_ms: _Optional[int] = ..., report_interval_ms: _Optional[int] = ...) -> None: ...

class SchedulerCommand(_message.Message):
    __slots__ = ("migrate", "drain")
    MIGRATE_FIELD_NUMBER: _ClassVar[int]
    DRAIN_FIELD_NUMBER: _ClassVar[int]
    migrate: MigrateCommand
    drain: DrainCommand
    def __init__(self, migrate: _Optional[_Union[MigrateCommand, _Mapping]] = ..., drain: _Optional[_Union[DrainCommand, _Mapping]] = ...) -> None: ...

class MigrateCommand(_message.Message):
    __slots__ = ("dst_instance_id", "dst_address", "num_requests", "request_id", "dst_transport_address")
    DST_INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    DST_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    NUM_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DST_TRANSPORT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    dst_instance_id: str
    dst_address: str
    num_requests: int
    request_id: str
    dst_transport_address: bytes
    def __init__(self, dst_instance_id: _Optional[str] = ..., dst_address: _Optional[str] = ..., num_requests: _Optional[int] = ..., request_id: _Optional[str] = ..., dst_transport_address: _Optional[bytes] = ...) -> None: ...

class DrainCommand(_message.Message):
    __slots__ = ("is_terminating",)
    IS_TERMINATING_FIELD_NUMBER: _ClassVar[int]
    is_terminating: bool
    def __init__(self, is_terminating: _Optional[bool] = ...) -> None: ...

class DeregisterInstanceRequest(_message.Message):
    __slots__ = ("instance_id",)
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    def __init__(self, instance_id: _Optional[str] = ...) -> None: ...

class DeregisterInstanceResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DispatchRequest(_message.Message):
    __slots__ = ("request_id", "num_prompt_tokens", "priority", "exclude_instance_ids")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_INSTANCE_IDS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    num_prompt_tokens: int
    priority: int
    exclude_instance_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, request_id: _Optional[str] = ..., num_prompt_tokens: _Optional[int] = ..., priority: _Optional[int] = ..., exclude_instance_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class DispatchResponse(_message.Message):
    __slots__ = ("instance_id", "address")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    address: str
    def __init__(self, instance_id: _Optional[str] = ..., address: _Optional[str] = ...) -> None: ...

class GetClusterStateRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ClusterState(_message.Message):
    __slots__ = ("instances", "num_migrations_ordered", "dispatch_policy", "migration_policy", "autoscale", "pending_instance_ids", "draining_instance_ids", "num_instances_started", "num_instances_stopped", "groups", "group_policy", "num_groups_dropped", "num_groups_restored", "num_group_operations_failed")
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    NUM_MIGRATIONS_ORDERED_FIELD_NUMBER: _ClassVar[int]
    DISPATCH_POLICY_FIELD_NUMBER: _ClassVar[int]
    MIGRATION_POLICY_FIELD_NUMBER: _ClassVar[int]
    AUTOSCALE_FIELD_NUMBER: _ClassVar[int]
    PENDING_INSTANCE_IDS_FIELD_NUMBER: _ClassVar[int]
    DRAINING_INSTANCE_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_INSTANCES_STARTED_FIELD_NUMBER: _ClassVar[int]
    NUM_INSTANCES_STOPPED_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    GROUP_POLICY_FIELD_NUMBER: _ClassVar[int]
    NUM_GROUPS_DROPPED_FIELD_NUMBER: _ClassVar[int]
    NUM_GROUPS_RESTORED_FIELD_NUMBER: _ClassVar[int]
    NUM_GROUP_OPERATIONS_FAILED_FIELD_NUMBER: _ClassVar[int]
    instances: _containers.RepeatedCompositeFieldContainer[InstanceState]
    num_migrations_ordered: int
    dispatch_policy: str
    migration_policy: str
    autoscale: bool
    pending_instance_ids: _containers.RepeatedScalarFieldContainer[str]
    draining_instance_ids: _containers.RepeatedScalarFieldContainer[str]
    num_instances_started: int
    num_instances_stopped: int
    groups: _containers.RepeatedCompositeFieldContainer[_group_pb2.GroupState]
    group_policy: str
    num_groups_dropped: int
    num_groups_restored: int
    num_group_operations_failed: int
    def __init__(self, instances: _Optional[_Iterable[_Union[InstanceState, _Mapping]]] = ..., num_migrations_ordered: _Optional[int] = ..., dispatch_policy: _Optional[str] = ..., migration_policy: _Optional[str] = ..., autoscale: _Optional[bool] = ..., pending_instance_ids: _Optional[_Iterable[str]] = ..., draining_instance_ids: _Optional[_Iterable[str]] = ..., num_instances_started: _Optional[int] = ..., num_instances_stopped: _Optional[int] = ..., groups: _Optional[_Iterable[_Union[_group_pb2.GroupState, _Mapping]]] = ..., group_policy: _Optional[str] = ..., num_groups_dropped: _Optional[int] = ..., num_groups_restored: _Optional[int] = ..., num_group_operations_failed: _Optional[int] = ...) -> None: ...

class InstanceState(_message.Message):
    __slots__ = ("info", "load", "ms_since_report")
    INFO_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    MS_SINCE_REPORT_FIELD_NUMBER: _ClassVar[int]
    info: _common_pb2.InstanceInfo
    load: _common_pb2.LoadReport
    ms_since_report: int
    def __init__(self, info: _Optional[_Union[_common_pb2.InstanceInfo, _Mapping]] = ..., load: _Optional[_Union[_common_pb2.LoadReport, _Mapping]] = ..., ms_since_report: _Optional[int] = ...) -> None: ...

class SchedulerMigrateRequest(_message.Message):
    __slots__ = ("src_instance_id", "dst_instance_id", "request_id", "num_requests")
    SRC_INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    DST_INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    src_instance_id: str
    dst_instance_id: str
    request_id: str
    num_requests: int
    def __init__(self, src_instance_id: _Optional[str] = ..., dst_instance_id: _Optional[str] = ..., request_id: _Optional[str] = ..., num_requests: _Optional[int] = ...) -> None: ...

class SchedulerMigrateResponse(_message.Message):
    __slots__ = ("ordered",)
    ORDERED_FIELD_NUMBER: _ClassVar[int]
    ordered: bool
    def __init__(self, ordered: _Optional[bool] = ...) -> None: ...

class SchedulerDrainRequest(_message.Message):
    __slots__ = ("instance_id", "is_terminating")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    IS_TERMINATING_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    is_terminating: bool
    def __init__(self, instance_id: _Optional[str] = ..., is_terminating: _Optional[bool] = ...) -> None: ...

class SchedulerDrainResponse(_message.Message):
    __slots__ = ("sent",)
    SENT_FIELD_NUMBER: _ClassVar[int]
    sent: bool
    def __init__(self, sent: _Optional[bool] = ...) -> None: ...

class DropGroupRequest(_message.Message):
    __slots__ = ("instance_ids",)
    INSTANCE_IDS_FIELD_NUMBER: _ClassVar[int]
    instance_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, instance_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class DropGroupResponse(_message.Message):
    __slots__ = ("group", "drop_ms")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    DROP_MS_FIELD_NUMBER: _ClassVar[int]
    group: _group_pb2.GroupState
    drop_ms: float
    def __init__(self, group: _Optional[_Union[_group_pb2.GroupState, _Mapping]] = ..., drop_ms: _Optional[float] = ...) -> None: ...

class RestoreGroupRequest(_message.Message):
    __slots__ = ("group_id",)
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    def __init__(self, group_id: _Optional[str] = ...) -> None: ...

class RestoreGroupResponse(_message.Message):
    __slots__ = ("num_requests_moved", "num_preempted", "restore_ms")
    NUM_REQUESTS_MOVED_FIELD_NUMBER: _ClassVar[int]
    NUM_PREEMPTED_FIELD_NUMBER: _ClassVar[int]
    RESTORE_MS_FIELD_NUMBER: _ClassVar[int]
    num_requests_moved: int
    num_preempted: int
    restore_ms: float
    def __init__(self, num_requests_moved: _Optional[int] = ..., num_preempted: _Optional[int] = ..., restore_ms: _Optional[float] = ...) -> None: ...
