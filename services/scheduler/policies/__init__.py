"""Scheduling policies: pure functions of load snapshots, shared by the live
scheduler and the simulator. Importing this package registers every policy."""

from services.scheduler.policies import dispatch as _dispatch  # noqa: F401  (registers)
from services.scheduler.policies.dispatch import DispatchInfo, DispatchPolicy
from services.scheduler.policies.load import InstanceLoad, LoadModelConfig, freeness, virtual_usage
from services.scheduler.policies.registry import DISPATCH_POLICIES, make_dispatch_policy

__all__ = [
    "DISPATCH_POLICIES",
    "DispatchInfo",
    "DispatchPolicy",
    "InstanceLoad",
    "LoadModelConfig",
    "freeness",
    "make_dispatch_policy",
    "virtual_usage",
]
