"""Hand-built load snapshots for policy tests."""

from __future__ import annotations

from services.policies import InstanceLoad, LoadModelConfig, make_instance_load


def load(
    instance_id: str,
    used: int = 0,
    running: int = 0,
    *,
    total: int = 100,
    waiting: int = 0,
    hol: int = 0,
    waiting_blocks: int | None = None,
    high: int = 0,
    terminating: bool = False,
    migrating: int = 0,
    headroom: int = 0,
    defrag: bool = True,
    group_id: str = "",
    group_stage: int = 0,
) -> InstanceLoad:
    """A snapshot whose virtual usage and freeness come from the real load model.

    `waiting_blocks` (all queued demand) defaults to the head of line's demand."""
    return make_instance_load(
        instance_id,
        num_total_blocks=total,
        num_used_blocks=used,
        num_running=running,
        num_waiting=waiting,
        num_hol_blocks=hol,
        num_waiting_blocks=hol if waiting_blocks is None else waiting_blocks,
        num_running_high_priority=high,
        is_terminating=terminating,
        num_migrating=migrating,
        group_id=group_id,
        group_stage=group_stage,
        config=LoadModelConfig(enable_defrag=defrag, high_priority_headroom_blocks=headroom),
    )
