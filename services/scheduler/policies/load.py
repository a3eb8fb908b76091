"""The Llumnix load model: virtual usage and freeness.

Every scheduling decision (dispatch, migration pairing, scaling, KunServe drop) reads
one number per instance, its *freeness*: roughly how many more decode steps its batch
can run before it runs out of KV blocks, after "virtual" demands are counted:

    virtual_usage = physical blocks of running requests
                  + blocks the head-of-line queued request needs   (de-fragmentation)
                  + headroom reserved for high-priority requests   (priorities)
                  = +inf for an instance being terminated          (drain by migration)
    freeness      = (total_blocks - virtual_usage) / max(batch_size, 1)

The worker's llumlet computes this from its engine and reports it; the simulator
computes it from the same engine classes, so both feed the policies the same numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class LoadModelConfig:
    """Knobs of the virtual-usage model."""

    # Count the head-of-line waiting request's block demand (de-fragmentation).
    enable_defrag: bool = True
    # Blocks of headroom reserved per running high-priority request.
    high_priority_headroom_blocks: int = 0

    def __post_init__(self) -> None:
        if self.high_priority_headroom_blocks < 0:
            raise ValueError(
                f"high_priority_headroom_blocks={self.high_priority_headroom_blocks} must be >= 0"
            )


@dataclass(frozen=True)
class InstanceLoad:
    """One instance's load snapshot, as policies see it (no gRPC types)."""

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
    # gRPC address of the worker; empty in the simulator.
    address: str = ""
    # Running requests that may be migrated: (request_id, num_tokens, num_blocks, priority).
    running: tuple[tuple[str, int, int, int], ...] = field(default=())


def virtual_usage(
    num_used_blocks: int,
    num_hol_blocks: int,
    num_running_high_priority: int,
    is_terminating: bool,
    config: LoadModelConfig = LoadModelConfig(),
) -> float:
    if is_terminating:
        return math.inf
    usage = float(num_used_blocks)
    if config.enable_defrag:
        usage += num_hol_blocks
    usage += num_running_high_priority * config.high_priority_headroom_blocks
    return usage


def freeness(num_total_blocks: int, usage: float, num_running: int) -> float:
    """(total - virtual usage) / batch size; -inf when terminating."""
    if math.isinf(usage):
        return -math.inf
    return (num_total_blocks - usage) / max(num_running, 1)
