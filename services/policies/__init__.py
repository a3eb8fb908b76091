"""Scheduling policies: pure functions of load snapshots, shared by the live
scheduler and the simulator. Importing this package registers every policy.

    kind        method                                          registered names (default first)
    dispatch    choose(loads, DispatchInfo) -> instance_id|None freest, round_robin, load_balance
    migration   pair(loads) -> [MigrationPair]                  freeness, none
    selection   select(running, num_requests, max_blocks)       lowest_priority_first,
                  -> [request_id]                                 shortest_first, longest_first
    scaling     decide(loads, now, num_pending) -> ScaleDecision freeness_band
    group       decide(loads, now) -> GroupDecision             kunserve, llmesh, none
                                                                  (KunServe drop/restore)

Presets (presets.py) name one policy per kind: recompute, llumnix, kunserve, llmesh.

See docs/policies.md for the load model and every default.
"""

from services.policies import dispatch as _dispatch  # noqa: F401  (registers)
from services.policies import kunserve as _kunserve  # noqa: F401  (registers)
from services.policies import migration as _migration  # noqa: F401  (registers)
from services.policies import scaling as _scaling  # noqa: F401  (registers)
from services.policies import selection as _selection  # noqa: F401  (registers)
from services.policies.dispatch import DispatchInfo, DispatchPolicy
from services.policies.kunserve import (
    GroupConfig,
    GroupDecision,
    GroupPolicy,
    capacity_gain,
)
from services.policies.load import (
    InstanceLoad,
    LoadModelConfig,
    RunningRequest,
    add_pending_dispatches,
    freeness,
    is_high_priority,
    make_instance_load,
    virtual_usage,
)
from services.policies.migration import MigrationConfig, MigrationPair, MigrationPolicy
from services.policies.registry import (
    DISPATCH_POLICIES,
    GROUP_POLICIES,
    MIGRATION_POLICIES,
    SCALING_POLICIES,
    SELECTION_POLICIES,
    make_dispatch_policy,
    make_group_policy,
    make_migration_policy,
    make_scaling_policy,
    make_selection_policy,
)
from services.policies.scaling import (
    ScaleAction,
    ScaleDecision,
    ScalingConfig,
    ScalingPolicy,
    average_freeness,
)
from services.policies.selection import SelectionPolicy

__all__ = [
    "DISPATCH_POLICIES",
    "GROUP_POLICIES",
    "GroupConfig",
    "GroupDecision",
    "GroupPolicy",
    "capacity_gain",
    "make_group_policy",
    "MIGRATION_POLICIES",
    "SCALING_POLICIES",
    "SELECTION_POLICIES",
    "DispatchInfo",
    "DispatchPolicy",
    "InstanceLoad",
    "LoadModelConfig",
    "MigrationConfig",
    "MigrationPair",
    "MigrationPolicy",
    "RunningRequest",
    "ScaleAction",
    "ScaleDecision",
    "ScalingConfig",
    "ScalingPolicy",
    "SelectionPolicy",
    "add_pending_dispatches",
    "average_freeness",
    "freeness",
    "is_high_priority",
    "make_dispatch_policy",
    "make_instance_load",
    "make_migration_policy",
    "make_scaling_policy",
    "make_selection_policy",
    "virtual_usage",
]
