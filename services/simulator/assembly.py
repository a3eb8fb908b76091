"""What a SimConfig and a profile make before a run starts: the requests checked
against them, every instance's EngineConfig, the global scheduler's policies, the cost
of a migration, and the costs, formation and GroupConfig of the KunServe group loop.

Pure functions of the config, apart from cluster.py so that the simulator's class reads
as what runs on the event loop, and a reader checking how a knob becomes an engine or a
group cost finds it in one place.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from services.policies import (
    DispatchPolicy,
    MigrationPolicy,
    ScalingPolicy,
    SelectionPolicy,
    make_dispatch_policy,
    make_migration_policy,
    make_scaling_policy,
    make_selection_policy,
)
from services.policies.kunserve import GroupConfig
from services.simulator.config import SimConfig
from services.simulator.group_state import GroupCost
from services.simulator.migration import MigrationCost
from services.simulator.profiles import SimProfile
from services.simulator.workload import SimRequest
from services.worker.engine.config import DTYPE_NBYTES, EngineConfig
from services.worker.engine.micro_batching import MicroBatchCost, MicroBatchFormation


def check_requests(
    config: SimConfig, profile: SimProfile, requests: Sequence[SimRequest], max_model_len: int
) -> None:
    """The profile matches the config; requests come in arrival order and fit."""
    if profile.block_size != config.block_size:
        raise ValueError(
            f"profile block_size={profile.block_size} != block_size={config.block_size}"
        )
    for a, b in zip(requests, requests[1:], strict=False):
        if b.arrival_s < a.arrival_s:
            raise ValueError(f"requests must be sorted by arrival time ({b.request_id})")
    for r in requests:
        if r.num_prompt_tokens + r.num_output_tokens > max_model_len:
            raise ValueError(
                f"request {r.request_id}: {r.num_prompt_tokens} + {r.num_output_tokens} "
                f"tokens exceed max_model_len={max_model_len}"
            )


def engine_config(config: SimConfig, profile: SimProfile, max_model_len: int) -> EngineConfig:
    """Every instance's engine: the profile's pool (or the config's), the config's knobs."""
    num_kv_blocks = config.num_kv_blocks or profile.num_kv_blocks
    if max_model_len > num_kv_blocks * config.block_size:
        raise ValueError(
            f"max_model_len={max_model_len} does not fit a pool of {num_kv_blocks} "
            f"blocks of {config.block_size} tokens (a request could never finish)"
        )
    return EngineConfig(
        block_size=config.block_size,
        memory_capacity_bytes=profile.memory_capacity_bytes,
        num_kv_blocks=num_kv_blocks,
        max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens,
        max_model_len=max_model_len,
        scheduling_policy=config.scheduling_policy,
    )


def scheduler_policies(
    config: SimConfig, profile: SimProfile, engine: EngineConfig
) -> tuple[DispatchPolicy, MigrationPolicy, SelectionPolicy, ScalingPolicy | None]:
    """Dispatch, migration pairing, selection and scaling (None: a fixed cluster).
    `freest` counts a KunServe group at its members' own capacity, which takes the
    weight share an instance's engine has."""
    dispatch_kwargs = (
        {"group_weight_share": weight_share(config, profile, engine)}
        if config.dispatch == "freest"
        else {}
    )
    return (
        make_dispatch_policy(config.dispatch, **dispatch_kwargs),
        make_migration_policy(config.migration, config=config.migration_config),
        make_selection_policy(config.selection),
        make_scaling_policy("freeness_band", config=config.scaling) if config.scaling else None,
    )


def migration_cost(config: SimConfig, profile: SimProfile) -> MigrationCost:
    """A migration's copy: the profile's KV bytes per block over the config's link."""
    return MigrationCost(
        bytes_per_block=profile.kv_bytes_per_token * config.block_size,
        bandwidth_bytes_per_s=config.migration_bandwidth_bytes_per_s,
        stage_overhead_s=config.migration_stage_overhead_s,
        last_stage_max_blocks=config.last_stage_max_blocks,
    )


def weight_share(config: SimConfig, profile: SimProfile, engine: EngineConfig) -> float:
    """Weights / memory of one instance, as its engine holds them (weights + pool)."""
    memory = profile.weight_nbytes + engine.num_kv_blocks * (
        profile.kv_bytes_per_token * config.block_size
    )
    return profile.weight_nbytes / memory


def group_config(config: SimConfig, profile: SimProfile, engine: EngineConfig) -> GroupConfig:
    """The config's GroupConfig with the weight share an instance's engine has."""
    return dataclasses.replace(
        config.group_config, weight_share=weight_share(config, profile, engine)
    )


def group_cost(config: SimConfig, profile: SimProfile) -> GroupCost:
    """KV, activations and weights between members: the migration link, the model's sizes."""
    model = profile.cost_profile.model
    return GroupCost(
        bandwidth_bytes_per_s=config.migration_bandwidth_bytes_per_s,
        kv_bytes_per_block_layer=profile.kv_bytes_per_token * config.block_size // model.num_layers,
        activation_bytes_per_token=model.hidden_size * DTYPE_NBYTES[profile.cost_profile.dtype],
        hop_latency_s=config.activation_hop_latency_s,
        join_s=config.group_join_s,
        two_phase_join=config.group_two_phase_join,
    )


def group_formation(config: SimConfig, profile: SimProfile) -> MicroBatchFormation:
    """How a group's leader forms micro-batches, with the profile's cost model."""
    return MicroBatchFormation(
        config.micro_batching,
        max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens,
        cost=MicroBatchCost.from_profile(profile.cost_profile),
        min_chunk_tokens=config.min_chunk_tokens,
    )
