"""Scheduler configuration: defaults, then LLMESH_SCHEDULER_<FIELD> env vars, then flags.

`policy` names a preset (services/policies/presets.py) that fills in
`dispatch_policy`, `migration_policy` and `group_policy`; each of the three given
explicitly (an env var or a flag: anything but the empty default) wins over the
preset. They are resolved in __post_init__, so the fields always hold the names in
use (`dataclasses.replace(config, policy=...)` therefore keeps the old three: build a
new config instead).
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from dataclasses import dataclass

from services.common.config import ConfigError, require
from services.common.telemetry_config import TelemetryConfig
from services.policies import (
    DISPATCH_POLICIES,
    GROUP_POLICIES,
    MIGRATION_POLICIES,
    SCALING_POLICIES,
    GroupConfig,
    MigrationConfig,
    ScalingConfig,
)
from services.policies.presets import PRESETS

PROVISIONERS = ("local",)
# SchedulerConfig field -> the GroupConfig field it sets.
GROUP_FIELDS = {
    "group_interval_s": "interval_s",
    "group_vote_demand_at_least": "vote_demand_at_least",
    "group_vote_window_s": "vote_window_s",
    "group_sizes": "group_sizes",
    "group_weight_share": "weight_share",
    "group_restore_usage_at_most": "restore_usage_at_most",
    "group_restore_window_s": "restore_window_s",
    "group_hold_s": "hold_s",
    "migration_dst_freeness_above": "migration_dst_freeness_above",
}


@dataclass(frozen=True)
class SchedulerConfig:
    """Knobs of the global scheduler process."""

    bind: str = "127.0.0.1:50052"  # host:port to listen on (port 0 = chosen by the OS)
    lease_s: float = 3.0  # an instance without a load report for this long is dropped
    report_interval_s: float = 0.05  # how often workers report load (told at registration)
    # Policy preset: recompute, llumnix, kunserve or llmesh. The default, llmesh, is
    # Llumnix's (freest, freeness) plus KunServe drops when no migration can help;
    # llumnix never drops on its own.
    policy: str = "llmesh"
    dispatch_policy: str = ""  # registered dispatch policy name ("" = the preset's)
    log_level: str = "INFO"  # DEBUG, INFO, WARNING or ERROR
    telemetry: TelemetryConfig = dataclasses.field(
        default_factory=TelemetryConfig
    )  # traces, /metrics
    ready_file: str = ""  # write {"address", "pid"} here once serving (process launchers)
    grace_s: float = 5.0  # graceful-stop grace period
    # KunServe: deadline of the Worker.FormGroup / DissolveGroup call that drops or
    # restores a group (stage 0 answers once the new capacity is usable / every member
    # serves alone again: weights freed or reloaded, requests handed over).
    group_timeout_s: float = 120.0

    # Migration loop (Llumnix): every interval, pair overloaded with free instances.
    migration_policy: str = ""  # registered pairing policy ("" = the preset's; none = no loop)
    migration_interval_s: float = 0.05  # between pairing rounds
    migration_src_freeness_below: float = 2.0  # sources: freeness below this
    migration_dst_freeness_above: float = 4.0  # destinations: freeness above this
    migration_max_per_instance: int = 2  # concurrent migrations an instance takes part in
    # After ordering a migration, leave both ends alone this long (their reports lag).
    migration_hold_s: float = 0.3

    # KunServe group loop: every interval, drop groups of overloaded instances and
    # restore groups whose load fell (services/policies/kunserve.py).
    group_policy: str = ""  # registered group policy ("" = the preset's; none = no loop)
    group_interval_s: float = 0.25  # between group rounds
    # An instance votes to drop once its KV usage stayed at least this, with queued
    # demand at least its free blocks...
    group_vote_demand_at_least: float = 0.95
    group_vote_window_s: float = 1.0  # ...for this long
    group_sizes: tuple[int, ...] = (2, 4)  # group sizes to choose from, increasing
    group_weight_share: float = 0.55  # weights / memory of one instance (plan; freest dispatch)
    # A group restores once its usage stayed at most this, falling, nothing waiting...
    group_restore_usage_at_most: float = 0.5
    group_restore_window_s: float = 2.0  # ...for this long
    # Hysteresis: a group serves at least this long; a restored instance does not vote
    # again for this long.
    group_hold_s: float = 5.0

    # Auto-scaling: keep the average freeness inside a band by starting workers through
    # the provisioner and draining (migrating away) and stopping them.
    autoscale: bool = False
    scaling_policy: str = "freeness_band"
    scaling_interval_s: float = 1.0  # between scaling rounds
    scale_up_freeness: float = 30.0  # add workers below this average freeness
    scale_down_freeness: float = 100.0  # drain one if the average stays above this without it
    scaling_cooldown_s: float = 10.0  # between two scaling actions
    min_instances: int = 1
    max_instances: int = 8
    provisioner: str = "local"  # "local": worker processes on this machine
    worker_model: str = "tiny"  # --model of provisioned workers
    worker_args: str = ""  # extra flags for provisioned workers (shell syntax)
    worker_log_dir: str = ""  # their logs (default: a new temp dir)

    def __post_init__(self) -> None:
        require(
            self.policy in PRESETS,
            f"policy={self.policy!r} is not one of {sorted(PRESETS)}",
        )
        chosen = PRESETS[self.policy]
        for name in ("dispatch_policy", "migration_policy", "group_policy"):
            if not getattr(self, name):
                object.__setattr__(self, name, getattr(chosen, name))
        require(":" in self.bind, f"bind={self.bind!r} must be host:port")
        require(self.lease_s > 0, f"lease_s={self.lease_s} must be > 0")
        require(
            self.report_interval_s > 0, f"report_interval_s={self.report_interval_s} must be > 0"
        )
        require(
            self.lease_s >= 4 * self.report_interval_s,
            f"lease_s={self.lease_s} must be at least 4 x report_interval_s={self.report_interval_s}",
        )
        require(
            self.dispatch_policy in DISPATCH_POLICIES,
            f"dispatch_policy={self.dispatch_policy!r} is not one of {sorted(DISPATCH_POLICIES)}",
        )
        require(self.grace_s >= 0, f"grace_s={self.grace_s} must be >= 0")
        require(self.group_timeout_s > 0, f"group_timeout_s={self.group_timeout_s} must be > 0")
        require(
            self.migration_policy in MIGRATION_POLICIES,
            f"migration_policy={self.migration_policy!r} is not one of {sorted(MIGRATION_POLICIES)}",
        )
        require(
            self.group_policy in GROUP_POLICIES,
            f"group_policy={self.group_policy!r} is not one of {sorted(GROUP_POLICIES)}",
        )
        require(
            self.migration_hold_s >= 0, f"migration_hold_s={self.migration_hold_s} must be >= 0"
        )
        require(
            self.scaling_policy in SCALING_POLICIES,
            f"scaling_policy={self.scaling_policy!r} is not one of {sorted(SCALING_POLICIES)}",
        )
        require(
            self.provisioner in PROVISIONERS,
            f"provisioner={self.provisioner!r} is not one of {list(PROVISIONERS)}",
        )
        try:
            shlex.split(self.worker_args)
        except ValueError as exc:
            raise ConfigError(
                f"worker_args={self.worker_args!r} is not valid shell syntax: {exc}"
            ) from None
        # The policy configs check their own fields, under their own names
        # (`interval_s`): say which of the two a bad value belongs to.
        for settings, make_config in (
            ("migration", self.migration_config),
            ("scaling", self.scaling_config),
        ):
            try:
                make_config()
            except ConfigError as exc:
                raise ConfigError(f"{settings} settings: {exc}") from None
        try:
            self.group_config()
        except ConfigError as exc:
            raise ConfigError(_group_error(str(exc))) from None

    def migration_config(self) -> MigrationConfig:
        return MigrationConfig(
            interval_s=self.migration_interval_s,
            src_freeness_below=self.migration_src_freeness_below,
            dst_freeness_above=self.migration_dst_freeness_above,
            max_migrations_per_instance=self.migration_max_per_instance,
        )

    def group_config(self) -> GroupConfig:
        return GroupConfig(
            **{group_field: getattr(self, field) for field, group_field in GROUP_FIELDS.items()}
        )

    def scaling_config(self) -> ScalingConfig:
        return ScalingConfig(
            interval_s=self.scaling_interval_s,
            scale_up_freeness=self.scale_up_freeness,
            scale_down_freeness=self.scale_down_freeness,
            cooldown_s=self.scaling_cooldown_s,
            min_instances=self.min_instances,
            max_instances=self.max_instances,
        )


def _group_error(message: str) -> str:
    """GroupConfig's message with its field names spelled as this config's fields
    (`vote_window_s=-1` -> `group_vote_window_s=-1`)."""
    for field, group_field in GROUP_FIELDS.items():
        if group_field != field:
            message = re.sub(rf"(?<![\w.]){group_field}=", f"{field}=", message)
    return message
