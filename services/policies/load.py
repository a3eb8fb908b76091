"""The Llumnix load model: virtual usage and freeness.

Every scheduling decision (dispatch, migration pairing, scaling) reads
one number per instance, its *freeness*: roughly how many more decode steps its batch
can run before it runs out of KV blocks, after "virtual" demands are counted:

    virtual_usage = physical blocks of running requests
                  + blocks the head-of-line queued request needs   (de-fragmentation)
                  + headroom reserved for high-priority requests   (priorities)
                  = +inf for an instance being terminated          (drain by migration)
    freeness      = (total_blocks - virtual_usage) / max(batch_size, 1)

The worker's llumlet computes this from its engine and reports it; the simulator
computes it from the same engine classes, so both feed the policies the same numbers.
`make_instance_load` is the one place that turns raw engine counts into a snapshot;
`add_pending_dispatches` is the one place that adds the requests dispatched to an
instance since its snapshot was taken (the live scheduler and the gateway's fallback).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import NamedTuple

from services.common.config import require

# Priorities follow the protos: 0 is normal, anything above is "high".
NORMAL_PRIORITY = 0


def is_high_priority(priority: int) -> bool:
    return priority > NORMAL_PRIORITY


@dataclass(frozen=True)
class LoadModelConfig:
    """Knobs of the virtual-usage model."""

    # Count the head-of-line waiting request's block demand (de-fragmentation).
    enable_defrag: bool = True
    # Blocks of headroom reserved per running high-priority request (0 = no priority support).
    high_priority_headroom_blocks: int = 0

    def __post_init__(self) -> None:
        require(
            self.high_priority_headroom_blocks >= 0,
            f"high_priority_headroom_blocks={self.high_priority_headroom_blocks} must be >= 0",
        )


class RunningRequest(NamedTuple):
    """A running request as a load snapshot lists it (a plain 4-tuple works too)."""

    request_id: str
    num_tokens: int
    num_blocks: int
    priority: int = NORMAL_PRIORITY


@dataclass(frozen=True)
class InstanceLoad:
    """One instance's load snapshot, as policies see it (no gRPC types).

    The worker's llumlet builds it with `make_instance_load` and reports it (a
    `services.common.messages.LoadReport` adds a sequence number); the simulator builds
    it the same way from its instances.
    """

    instance_id: str
    num_total_blocks: int
    num_used_blocks: int
    num_running: int
    num_waiting: int
    num_hol_blocks: int = 0
    num_running_high_priority: int = 0
    is_terminating: bool = False
    num_migrating: int = 0
    virtual_usage: float = 0.0
    freeness: float = 0.0
    # Running requests that may be migrated: (request_id, num_tokens, num_blocks, priority).
    running: tuple[RunningRequest, ...] = field(default=())
    # Blocks all waiting requests need (the load-balance-only baseline counts them).
    num_waiting_blocks: int = 0
    # The part of `virtual_usage` that is high-priority headroom (it steers migration;
    # dispatch ranks physical demand and does not count it).
    num_headroom_blocks: int = 0
    # Cumulative preemptions since the instance started.
    num_preemptions: int = 0
    # Tokens per KV block (turns a prompt length into a block demand). A load report
    # does not carry it: the scheduler and the gateway take it from the registration.
    block_size: int = 16
    # KunServe group the instance serves in ("" when alone) and its pipeline stage.
    # Stage 0 reports the group's requests and blocks and takes its dispatches.
    group_id: str = ""
    group_stage: int = 0

    @property
    def is_group_follower(self) -> bool:
        """A pipeline stage other than 0: it schedules nothing and takes no requests."""
        return self.group_id != "" and self.group_stage > 0

    @property
    def is_in_group(self) -> bool:
        return self.group_id != ""


def headroom_blocks(num_running_high_priority: int, config: LoadModelConfig) -> int:
    return num_running_high_priority * config.high_priority_headroom_blocks


def virtual_usage(
    num_used_blocks: int,
    num_hol_blocks: int,
    num_running_high_priority: int,
    is_terminating: bool,
    config: LoadModelConfig = LoadModelConfig(),
) -> float:
    """Physical blocks + head-of-line demand + high-priority headroom; +inf if terminating."""
    if is_terminating:
        return math.inf
    usage = float(num_used_blocks)
    if config.enable_defrag:
        usage += num_hol_blocks
    usage += headroom_blocks(num_running_high_priority, config)
    return usage


def freeness(num_total_blocks: int, usage: float, num_running: int) -> float:
    """(total - virtual usage) / batch size; -inf when terminating."""
    if math.isinf(usage):
        return -math.inf
    return (num_total_blocks - usage) / max(num_running, 1)


def make_instance_load(
    instance_id: str,
    *,
    num_total_blocks: int,
    num_used_blocks: int,
    num_running: int,
    num_waiting: int = 0,
    num_hol_blocks: int = 0,
    num_waiting_blocks: int = 0,
    num_running_high_priority: int = 0,
    is_terminating: bool = False,
    num_migrating: int = 0,
    num_preemptions: int = 0,
    running: Iterable[tuple[str, int, int, int]] = (),
    block_size: int = 16,
    group_id: str = "",
    group_stage: int = 0,
    config: LoadModelConfig = LoadModelConfig(),
) -> InstanceLoad:
    """A snapshot with `virtual_usage` and `freeness` filled in by the load model."""
    usage = virtual_usage(
        num_used_blocks, num_hol_blocks, num_running_high_priority, is_terminating, config
    )
    return InstanceLoad(
        instance_id=instance_id,
        num_total_blocks=num_total_blocks,
        num_used_blocks=num_used_blocks,
        num_running=num_running,
        num_waiting=num_waiting,
        num_hol_blocks=num_hol_blocks,
        num_running_high_priority=num_running_high_priority,
        is_terminating=is_terminating,
        num_migrating=num_migrating,
        virtual_usage=usage,
        freeness=freeness(num_total_blocks, usage, num_running),
        running=tuple(RunningRequest(*r) for r in running),
        num_waiting_blocks=num_waiting_blocks,
        num_headroom_blocks=0
        if is_terminating
        else headroom_blocks(num_running_high_priority, config),
        num_preemptions=num_preemptions,
        block_size=block_size,
        group_id=group_id,
        group_stage=group_stage,
    )


def add_pending_dispatches(load: InstanceLoad, num_requests: int, num_blocks: int) -> InstanceLoad:
    """`load` plus `num_requests` requests dispatched to the instance since it was taken.

    They are queued there as far as the policies can tell, so they count as waiting
    requests whose prompts need `num_blocks` blocks, and that demand is virtual usage
    (a burst then spreads instead of landing on the instance that looked freest at the
    last report). A terminating instance's load stays as it is (already infinite).
    """
    if num_requests == 0 or math.isinf(load.virtual_usage):
        return load
    usage = load.virtual_usage + num_blocks
    return replace(
        load,
        num_waiting=load.num_waiting + num_requests,
        num_waiting_blocks=load.num_waiting_blocks + num_blocks,
        virtual_usage=usage,
        freeness=freeness(load.num_total_blocks, usage, load.num_running),
    )
