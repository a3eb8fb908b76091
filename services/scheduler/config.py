"""Scheduler configuration: defaults, then LLMESH_SCHEDULER_<FIELD> env vars, then flags."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.config import require
from services.scheduler.policies import DISPATCH_POLICIES


@dataclass(frozen=True)
class SchedulerConfig:
    """Knobs of the global scheduler process."""

    bind: str = "127.0.0.1:50052"  # host:port to listen on (port 0 = chosen by the OS)
    lease_ms: int = 3000  # an instance without a load report for this long is dropped
    report_interval_ms: int = 50  # how often workers report load (told at registration)
    dispatch_policy: str = "freest"  # registered dispatch policy name
    log_level: str = "INFO"  # DEBUG, INFO, WARNING or ERROR
    otlp_endpoint: str = ""  # OTLP/gRPC trace collector (empty = traces not exported)
    ready_file: str = ""  # write {"address", "pid"} here once serving (process launchers)
    grace_s: float = 5.0  # graceful-stop grace period

    def __post_init__(self) -> None:
        require(":" in self.bind, f"bind={self.bind!r} must be host:port")
        require(self.lease_ms > 0, f"lease_ms={self.lease_ms} must be > 0")
        require(
            self.report_interval_ms > 0, f"report_interval_ms={self.report_interval_ms} must be > 0"
        )
        require(
            self.lease_ms >= 4 * self.report_interval_ms,
            f"lease_ms={self.lease_ms} must be at least 4 x report_interval_ms={self.report_interval_ms}",
        )
        require(
            self.dispatch_policy in DISPATCH_POLICIES,
            f"dispatch_policy={self.dispatch_policy!r} is not one of {sorted(DISPATCH_POLICIES)}",
        )
        require(self.grace_s >= 0, f"grace_s={self.grace_s} must be >= 0")
