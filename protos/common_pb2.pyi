from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_ABORT: _ClassVar[FinishReason]
    FINISH_REASON_ERROR: _ClassVar[FinishReason]

class KernelBackend(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KERNEL_BACKEND_UNSPECIFIED: _ClassVar[KernelBackend]
    KERNEL_BACKEND_NATIVE: _ClassVar[KernelBackend]
    KERNEL_BACKEND_TORCH: _ClassVar[KernelBackend]
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_ABORT: FinishReason
FINISH_REASON_ERROR: FinishReason
KERNEL_BACKEND_UNSPECIFIED: KernelBackend
KERNEL_BACKEND_NATIVE: KernelBackend
KERNEL_BACKEND_TORCH: KernelBackend

class SamplingParams(_message.Message):
    __slots__ = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop_token_ids", "ignore_eos")
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    ignore_eos: bool
    def __init__(self, max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., ignore_eos: _Optional[bool] = ...) -> None: ...

class RequestState(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "output_token_ids", "sampling", "priority", "num_computed_tokens", "arrival_time", "owner_address", "trace_context", "placement_epoch")
    class TraceContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    NUM_COMPUTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ARRIVAL_TIME_FIELD_NUMBER: _ClassVar[int]
    OWNER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TRACE_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_EPOCH_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    output_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: SamplingParams
    priority: int
    num_computed_tokens: int
    arrival_time: float
    owner_address: str
    trace_context: _containers.ScalarMap[str, str]
    placement_epoch: int
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., output_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., priority: _Optional[int] = ..., num_computed_tokens: _Optional[int] = ..., arrival_time: _Optional[float] = ..., owner_address: _Optional[str] = ..., trace_context: _Optional[_Mapping[str, str]] = ..., placement_epoch: _Optional[int] = ...) -> None: ...

class LoadReport(_message.Message):
    __slots__ = ("instance_id", "seq", "num_running", "num_waiting", "num_total_blocks", "num_used_blocks", "num_hol_blocks", "num_running_high_priority", "virtual_usage", "freeness", "is_terminating", "num_preemptions", "num_migrating", "running", "is_integrity_checked", "integrity_error", "num_waiting_blocks", "num_headroom_blocks", "group_id", "group_stage", "layer_start", "layer_end", "freed_weight_bytes", "arrived_request_ids")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    NUM_RUNNING_FIELD_NUMBER: _ClassVar[int]
    NUM_WAITING_FIELD_NUMBER: _ClassVar[int]
    NUM_TOTAL_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_USED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_HOL_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_RUNNING_HIGH_PRIORITY_FIELD_NUMBER: _ClassVar[int]
    VIRTUAL_USAGE_FIELD_NUMBER: _ClassVar[int]
    FREENESS_FIELD_NUMBER: _ClassVar[int]
    IS_TERMINATING_FIELD_NUMBER: _ClassVar[int]
    NUM_PREEMPTIONS_FIELD_NUMBER: _ClassVar[int]
    NUM_MIGRATING_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    IS_INTEGRITY_CHECKED_FIELD_NUMBER: _ClassVar[int]
    INTEGRITY_ERROR_FIELD_NUMBER: _ClassVar[int]
    NUM_WAITING_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_HEADROOM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    GROUP_STAGE_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    FREED_WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    ARRIVED_REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    seq: int
    num_running: int
    num_waiting: int
    num_total_blocks: int
    num_used_blocks: int
    num_hol_blocks: int
    num_running_high_priority: int
    virtual_usage: float
    freeness: float
    is_terminating: bool
    num_preemptions: int
    num_migrating: int
    running: _containers.RepeatedCompositeFieldContainer[RunningRequest]
    is_integrity_checked: bool
    integrity_error: str
    num_waiting_blocks: int
    num_headroom_blocks: int
    group_id: str
    group_stage: int
    layer_start: int
    layer_end: int
    freed_weight_bytes: int
    arrived_request_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, instance_id: _Optional[str] = ..., seq: _Optional[int] = ..., num_running: _Optional[int] = ..., num_waiting: _Optional[int] = ..., num_total_blocks: _Optional[int] = ..., num_used_blocks: _Optional[int] = ..., num_hol_blocks: _Optional[int] = ..., num_running_high_priority: _Optional[int] = ..., virtual_usage: _Optional[float] = ..., freeness: _Optional[float] = ..., is_terminating: _Optional[bool] = ..., num_preemptions: _Optional[int] = ..., num_migrating: _Optional[int] = ..., running: _Optional[_Iterable[_Union[RunningRequest, _Mapping]]] = ..., is_integrity_checked: _Optional[bool] = ..., integrity_error: _Optional[str] = ..., num_waiting_blocks: _Optional[int] = ..., num_headroom_blocks: _Optional[int] = ..., group_id: _Optional[str] = ..., group_stage: _Optional[int] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., freed_weight_bytes: _Optional[int] = ..., arrived_request_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class RunningRequest(_message.Message):
    __slots__ = ("request_id", "num_tokens", "num_blocks", "priority")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    num_tokens: int
    num_blocks: int
    priority: int
    def __init__(self, request_id: _Optional[str] = ..., num_tokens: _Optional[int] = ..., num_blocks: _Optional[int] = ..., priority: _Optional[int] = ...) -> None: ...

class InstanceInfo(_message.Message):
    __slots__ = ("instance_id", "address", "transport_address", "transport_backend", "model_id", "memory_capacity_bytes", "block_size", "layer_start", "layer_end", "num_layers", "max_model_len", "vocab_size", "eos_token_id", "kernels")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_BACKEND_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    MEMORY_CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    KERNELS_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    address: str
    transport_address: bytes
    transport_backend: str
    model_id: str
    memory_capacity_bytes: int
    block_size: int
    layer_start: int
    layer_end: int
    num_layers: int
    max_model_len: int
    vocab_size: int
    eos_token_id: int
    kernels: KernelBackend
    def __init__(self, instance_id: _Optional[str] = ..., address: _Optional[str] = ..., transport_address: _Optional[bytes] = ..., transport_backend: _Optional[str] = ..., model_id: _Optional[str] = ..., memory_capacity_bytes: _Optional[int] = ..., block_size: _Optional[int] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., num_layers: _Optional[int] = ..., max_model_len: _Optional[int] = ..., vocab_size: _Optional[int] = ..., eos_token_id: _Optional[int] = ..., kernels: _Optional[_Union[KernelBackend, str]] = ...) -> None: ...
