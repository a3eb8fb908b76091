"""Scheduler configuration: defaults, then LLMESH_SCHEDULER_<FIELD> env vars, then flags."""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from services.common.config import ConfigError, require
from services.policies import (
    DISPATCH_POLICIES,
    MIGRATION_POLICIES,
    SCALING_POLICIES,
    MigrationConfig,
    ScalingConfig,
)

PROVISIONERS = ("local",)


@dataclass(frozen=True)
class SchedulerConfig:
    """Knobs of the global scheduler process."""

    bind: str = "127.0.0.1:50052"  # host:port to listen on (port 0 = chosen by the OS)
    lease_s: float = 3.0  # an instance without a load report for this long is dropped
    report_interval_s: float = 0.05  # how often workers report load (told at registration)
    dispatch_policy: str = "freest"  # registered dispatch policy name
    log_level: str = "INFO"  # DEBUG, INFO, WARNING or ERROR
    otlp_endpoint: str = ""  # OTLP/gRPC trace collector (empty = traces not exported)
    ready_file: str = ""  # write {"address", "pid"} here once serving (process launchers)
    grace_s: float = 5.0  # graceful-stop grace period
    # KunServe: deadline of the Worker.FormGroup / DissolveGroup call that drops or
    # restores a group (stage 0 answers once the new capacity is usable / every member
    # serves alone again: weights freed or reloaded, requests handed over).
    group_timeout_s: float = 120.0

    # Migration loop (Llumnix): every interval, pair overloaded with free instances.
    migration_policy: str = "freeness"  # registered pairing policy; "none" = no loop
    migration_interval_s: float = 0.05  # between pairing rounds
    migration_src_freeness_below: float = 2.0  # sources: freeness below this
    migration_dst_freeness_above: float = 4.0  # destinations: freeness above this
    migration_max_per_instance: int = 2  # concurrent migrations an instance takes part in
    # After ordering a migration, leave both ends alone this long (their reports lag).
    migration_hold_s: float = 0.3

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

    def migration_config(self) -> MigrationConfig:
        return MigrationConfig(
            interval_s=self.migration_interval_s,
            src_freeness_below=self.migration_src_freeness_below,
            dst_freeness_above=self.migration_dst_freeness_above,
            max_migrations_per_instance=self.migration_max_per_instance,
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
