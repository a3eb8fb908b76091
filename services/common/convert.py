"""protobuf <-> services.common.messages, in one place.

Only servicers and service clients call these; everything behind them sees dataclasses.
"""

from __future__ import annotations

from protos import common_pb2, gateway_pb2, worker_pb2
from services.common.messages import (
    FinishReason,
    InstanceSpec,
    LoadReport,
    OutputDelta,
    RequestSpec,
    SamplingSpec,
)
from services.common.migration import MigrationMode, MigrationStatus
from services.policies import InstanceLoad, RunningRequest

_FINISH_TO_PROTO = {
    FinishReason.NONE: common_pb2.FINISH_REASON_UNSPECIFIED,
    FinishReason.LENGTH: common_pb2.FINISH_REASON_LENGTH,
    FinishReason.STOP: common_pb2.FINISH_REASON_STOP,
    FinishReason.ABORT: common_pb2.FINISH_REASON_ABORT,
    FinishReason.ERROR: common_pb2.FINISH_REASON_ERROR,
}
_FINISH_FROM_PROTO = {v: k for k, v in _FINISH_TO_PROTO.items()}


def finish_reason_to_proto(reason: FinishReason) -> int:
    return _FINISH_TO_PROTO[reason]


def finish_reason_from_proto(value: int) -> FinishReason:
    return _from_proto(_FINISH_FROM_PROTO, value, "finish_reason")


def _from_proto(table: dict, value: int, name: str):
    try:
        return table[value]
    except KeyError:
        raise ValueError(f"{name}={value} is not a known value") from None


# ---- kernel backends and migration enums ----------------------------------------------

_KERNELS_TO_PROTO = {
    "": common_pb2.KERNEL_BACKEND_UNSPECIFIED,
    "native": common_pb2.KERNEL_BACKEND_NATIVE,
    "torch": common_pb2.KERNEL_BACKEND_TORCH,
}
_KERNELS_FROM_PROTO = {v: k for k, v in _KERNELS_TO_PROTO.items()}

_MODE_TO_PROTO = {
    MigrationMode.LIVE: worker_pb2.MIGRATION_MODE_LIVE,
    MigrationMode.BLOCKING_COPY: worker_pb2.MIGRATION_MODE_BLOCKING_COPY,
    MigrationMode.RECOMPUTE: worker_pb2.MIGRATION_MODE_RECOMPUTE,
}
# An unset mode is a live migration.
_MODE_FROM_PROTO = {
    worker_pb2.MIGRATION_MODE_UNSPECIFIED: MigrationMode.LIVE,
    **{v: k for k, v in _MODE_TO_PROTO.items()},
}

_STATUS_TO_PROTO = {
    MigrationStatus.PREPARING: worker_pb2.MIGRATION_STATUS_PREPARING,
    MigrationStatus.COPYING: worker_pb2.MIGRATION_STATUS_COPYING,
    MigrationStatus.STOPPED: worker_pb2.MIGRATION_STATUS_STOPPED,
    MigrationStatus.COMMITTING: worker_pb2.MIGRATION_STATUS_COMMITTING,
    MigrationStatus.COMMITTED: worker_pb2.MIGRATION_STATUS_COMMITTED,
    MigrationStatus.ABORTED: worker_pb2.MIGRATION_STATUS_ABORTED,
}
_STATUS_FROM_PROTO = {v: k for k, v in _STATUS_TO_PROTO.items()}


def kernels_to_proto(kernels: str) -> int:
    """ "native" / "torch" / "" (not reported) as a KernelBackend."""
    if kernels not in _KERNELS_TO_PROTO:
        raise ValueError(f"kernels={kernels!r} is not one of {sorted(_KERNELS_TO_PROTO)}")
    return _KERNELS_TO_PROTO[kernels]


def kernels_from_proto(value: int) -> str:
    """The backend's name; "" (unknown) for a value this build does not know, so a newer
    worker's registration still reads (migrations pair and accept equal known names only)."""
    return _KERNELS_FROM_PROTO.get(value, "")


def migration_mode_to_proto(mode: MigrationMode) -> int:
    return _MODE_TO_PROTO[mode]


def migration_mode_from_proto(value: int) -> MigrationMode:
    return _from_proto(_MODE_FROM_PROTO, value, "mode")


def migration_status_to_proto(status: MigrationStatus) -> int:
    return _STATUS_TO_PROTO[status]


def migration_status_from_proto(value: int) -> MigrationStatus:
    return _from_proto(_STATUS_FROM_PROTO, value, "status")


# ---- InstanceInfo -----------------------------------------------------------------


def instance_spec_to_proto(spec: InstanceSpec) -> common_pb2.InstanceInfo:
    return common_pb2.InstanceInfo(
        instance_id=spec.instance_id,
        address=spec.address,
        transport_address=spec.transport_address,
        transport_backend=spec.transport_backend,
        kernels=kernels_to_proto(spec.kernels),
        model_id=spec.model_id,
        memory_capacity_bytes=spec.memory_capacity_bytes,
        block_size=spec.block_size,
        layer_start=spec.layer_start,
        layer_end=spec.layer_end,
        num_layers=spec.num_layers,
        max_model_len=spec.max_model_len,
        vocab_size=spec.vocab_size,
        eos_token_id=spec.eos_token_id,
    )


def instance_spec_from_proto(info: common_pb2.InstanceInfo) -> InstanceSpec:
    if not info.instance_id:
        raise ValueError("info.instance_id must not be empty")
    if not info.address:
        raise ValueError("info.address must not be empty")
    if info.block_size <= 0:
        raise ValueError(f"info.block_size={info.block_size} must be > 0")
    return InstanceSpec(
        instance_id=info.instance_id,
        address=info.address,
        model_id=info.model_id,
        block_size=info.block_size,
        num_layers=info.num_layers,
        layer_start=info.layer_start,
        layer_end=info.layer_end,
        max_model_len=info.max_model_len,
        vocab_size=info.vocab_size,
        eos_token_id=info.eos_token_id,
        memory_capacity_bytes=info.memory_capacity_bytes,
        transport_address=bytes(info.transport_address),
        transport_backend=info.transport_backend,
        kernels=kernels_from_proto(info.kernels),
    )


# ---- LoadReport -------------------------------------------------------------------


def load_to_proto(report: LoadReport) -> common_pb2.LoadReport:
    load = report.load
    return common_pb2.LoadReport(
        instance_id=load.instance_id,
        seq=report.seq,
        num_running=load.num_running,
        num_waiting=load.num_waiting,
        num_total_blocks=load.num_total_blocks,
        num_used_blocks=load.num_used_blocks,
        num_hol_blocks=load.num_hol_blocks,
        num_running_high_priority=load.num_running_high_priority,
        virtual_usage=load.virtual_usage,
        freeness=load.freeness,
        is_terminating=load.is_terminating,
        num_preemptions=load.num_preemptions,
        num_migrating=load.num_migrating,
        running=[
            common_pb2.RunningRequest(
                request_id=r.request_id,
                num_tokens=r.num_tokens,
                num_blocks=r.num_blocks,
                priority=r.priority,
            )
            for r in load.running
        ],
        is_integrity_checked=report.is_integrity_checked,
        integrity_error=report.integrity_error,
        num_waiting_blocks=load.num_waiting_blocks,
        num_headroom_blocks=load.num_headroom_blocks,
        group_id=load.group_id,
        group_stage=load.group_stage,
        layer_start=report.layer_start,
        layer_end=report.layer_end,
        freed_weight_bytes=report.freed_weight_bytes,
        arrived_request_ids=list(report.arrived_request_ids),
    )


def load_from_proto(report: common_pb2.LoadReport, block_size: int) -> LoadReport:
    """The report as sent. A report does not carry the instance's block size: pass the
    one its registration (InstanceInfo.block_size) gave."""
    if not report.instance_id:
        raise ValueError("load report instance_id must not be empty")
    load = InstanceLoad(
        instance_id=report.instance_id,
        block_size=block_size,
        num_total_blocks=report.num_total_blocks,
        num_used_blocks=report.num_used_blocks,
        num_running=report.num_running,
        num_waiting=report.num_waiting,
        num_hol_blocks=report.num_hol_blocks,
        num_running_high_priority=report.num_running_high_priority,
        is_terminating=report.is_terminating,
        num_migrating=report.num_migrating,
        virtual_usage=report.virtual_usage,
        freeness=report.freeness,
        running=tuple(
            RunningRequest(r.request_id, r.num_tokens, r.num_blocks, r.priority)
            for r in report.running
        ),
        num_waiting_blocks=report.num_waiting_blocks,
        num_headroom_blocks=report.num_headroom_blocks,
        num_preemptions=report.num_preemptions,
        group_id=report.group_id,
        group_stage=report.group_stage,
    )
    return LoadReport(
        load=load,
        seq=report.seq,
        is_integrity_checked=report.is_integrity_checked,
        integrity_error=report.integrity_error,
        layer_start=report.layer_start,
        layer_end=report.layer_end,
        freed_weight_bytes=report.freed_weight_bytes,
        arrived_request_ids=tuple(report.arrived_request_ids),
    )


# ---- SamplingParams / RequestState ------------------------------------------------


def sampling_to_proto(sampling: SamplingSpec) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(
        max_tokens=sampling.max_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        seed=sampling.seed,
        stop_token_ids=list(sampling.stop_token_ids),
        ignore_eos=sampling.ignore_eos,
    )


def request_to_proto(spec: RequestSpec) -> common_pb2.RequestState:
    return common_pb2.RequestState(
        request_id=spec.request_id,
        prompt_token_ids=list(spec.prompt_token_ids),
        output_token_ids=list(spec.output_token_ids),
        sampling=sampling_to_proto(spec.sampling),
        priority=spec.priority,
        num_computed_tokens=spec.num_computed_tokens,
        arrival_time=spec.arrival_time,
        owner_address=spec.owner_address,
        trace_context=dict(spec.trace_context),
    )


def request_from_proto(state: common_pb2.RequestState) -> RequestSpec:
    """A RequestState from a peer service. Values are checked by the engine itself;
    only what it cannot know (ids, addresses, seed presence) is checked here."""
    if not state.request_id:
        raise ValueError("state.request_id must not be empty")
    if not state.owner_address:
        raise ValueError("state.owner_address must not be empty")
    if not state.sampling.HasField("seed"):
        raise ValueError("state.sampling.seed must be set")
    s = state.sampling
    return RequestSpec(
        request_id=state.request_id,
        prompt_token_ids=tuple(state.prompt_token_ids),
        output_token_ids=tuple(state.output_token_ids),
        sampling=SamplingSpec(
            max_tokens=s.max_tokens,
            temperature=s.temperature,
            top_p=s.top_p if s.top_p != 0 else 1.0,
            top_k=s.top_k,
            seed=s.seed,
            stop_token_ids=tuple(s.stop_token_ids),
            ignore_eos=s.ignore_eos,
        ),
        priority=state.priority,
        num_computed_tokens=state.num_computed_tokens,
        arrival_time=state.arrival_time,
        owner_address=state.owner_address,
        trace_context=dict(state.trace_context),
    )


# ---- OutputBatch ------------------------------------------------------------------


# The token path: one OutputBatch per step, one entry per running request. `add()`
# with keywords is the cheapest way to fill a repeated message field with upb.


def outputs_to_proto(instance_id: str, deltas: list[OutputDelta]) -> gateway_pb2.OutputBatch:
    batch = gateway_pb2.OutputBatch(instance_id=instance_id)
    add = batch.outputs.add
    for d in deltas:
        if d.moved_to_instance_id or d.placement_epoch:  # rare: only around migrations
            add(
                request_id=d.request_id,
                first_token_index=d.first_token_index,
                token_ids=d.token_ids,
                finish_reason=_FINISH_TO_PROTO[d.finish_reason],
                error=d.error,
                moved_to_instance_id=d.moved_to_instance_id,
                moved_to_address=d.moved_to_address,
                placement_epoch=d.placement_epoch,
            )
        elif d.finish_reason is FinishReason.NONE:
            add(
                request_id=d.request_id,
                first_token_index=d.first_token_index,
                token_ids=d.token_ids,
            )
        else:
            add(
                request_id=d.request_id,
                first_token_index=d.first_token_index,
                token_ids=d.token_ids,
                finish_reason=_FINISH_TO_PROTO[d.finish_reason],
                error=d.error,
            )
    return batch


def outputs_from_proto(batch: gateway_pb2.OutputBatch) -> list[OutputDelta]:
    return [
        OutputDelta(
            o.request_id,
            o.first_token_index,
            tuple(o.token_ids),
            (
                _from_proto(_FINISH_FROM_PROTO, o.finish_reason, "finish_reason")
                if o.finish_reason  # the common case, unfinished, without a lookup
                else FinishReason.NONE
            ),
            o.error,
            o.moved_to_instance_id,
            o.moved_to_address,
            o.placement_epoch,
        )
        for o in batch.outputs
    ]
