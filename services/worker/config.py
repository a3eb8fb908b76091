"""Worker configuration: defaults, then LLMESH_WORKER_<FIELD> env vars, then flags.

The engine's, the migration's and KunServe's knobs nest (`WorkerConfig.engine`,
`WorkerConfig.migration`, `WorkerConfig.kunserve`): their env vars are
LLMESH_WORKER_ENGINE_<FIELD>, LLMESH_WORKER_KUNSERVE_<FIELD> and
LLMESH_WORKER_MIGRATION_<FIELD>, their flags' argparse dests `engine.<field>` and
`migration.<field>` (services/worker/__main__.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from services.common.config import require
from services.common.telemetry_config import TelemetryConfig
from services.worker.engine.config import EngineConfig
from services.worker.kunserve.config import KunServeConfig
from services.worker.migration.config import MigrationConfig


@dataclass(frozen=True)
class WorkerConfig:
    """Knobs of one worker process."""

    bind: str = "127.0.0.1:0"  # host:port of the Worker API (port 0 = chosen by the OS)
    advertise_address: str = ""  # address peers use to reach it; empty = the bound address
    scheduler_address: str = "127.0.0.1:50052"  # global scheduler host:port
    instance_id: str = ""  # stable id; empty = "worker-<random>" chosen at start
    engine: EngineConfig = field(default_factory=EngineConfig)  # model, KV pool, batch, kernels
    migration: MigrationConfig = field(default_factory=MigrationConfig)  # live migration
    kunserve: KunServeConfig = field(default_factory=KunServeConfig)  # KunServe groups
    torch_threads: int = 0  # torch intra-op threads; 0 = torch's default
    # How long the engine thread may hold the GIL while the gRPC/migration event loop
    # waits for it (Python's default is 5000 us). Every handoff on the control path
    # (load reports, output pushes, migration stages and commit) can wait this long.
    gil_switch_interval_us: int = 500
    enable_defrag: bool = True  # count the head-of-line request's demand in virtual usage
    high_priority_headroom_blocks: int = 0  # headroom reserved per running high-priority request
    # Submit answers RESOURCE_EXHAUSTED while this many requests wait in the engine's
    # queue (none = unbounded); the gateway then tries another instance or sheds.
    max_waiting_requests: int | None = 256
    report_interval_s: float = 0.05  # load report period (the scheduler's reply overrides it)
    owner_unreachable_s: float = 10.0  # abort a gateway's requests when it is unreachable this long
    log_level: str = "INFO"  # DEBUG, INFO, WARNING or ERROR
    # Log every engine step's wall and CPU time and batch shape (`engine_step`; `bench
    # burst` compares them with the simulator's cost model). Off: a line per step.
    step_log: bool = False
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)  # traces, /metrics
    ready_file: str = ""  # write {"address", "pid"} here once serving (process launchers)
    grace_s: float = 5.0  # graceful-stop grace period
    transport_backend: str = "ucx"  # data plane for KV: "ucx" (default) or "tcp" (fallback)
    # The TCP data plane's listener (host:port; port 0 = chosen by the OS) and the
    # host:port peers are told (empty = the bound one, a wildcard host replaced by this
    # host's name). UCX has no listener: its address lists the IPs of the interfaces
    # UCX_NET_DEVICES selects, so a UCX worker must not sit behind NAT (docs/deployment.md).
    transport_bind: str = "127.0.0.1:0"
    transport_advertise_address: str = ""

    def __post_init__(self) -> None:
        require(":" in self.bind, f"bind={self.bind!r} must be host:port")
        require(
            self.advertise_address == "" or ":" in self.advertise_address,
            f"advertise_address={self.advertise_address!r} must be host:port or empty",
        )
        require(
            self.transport_bind.rpartition(":")[2].isdigit(),
            f"transport_bind={self.transport_bind!r} must be host:port",
        )
        require(
            self.transport_advertise_address == "" or ":" in self.transport_advertise_address,
            f"transport_advertise_address={self.transport_advertise_address!r} must be "
            "host:port or empty",
        )
        require(
            ":" in self.scheduler_address,
            f"scheduler_address={self.scheduler_address!r} must be host:port",
        )
        require(self.torch_threads >= 0, f"torch_threads={self.torch_threads} must be >= 0")
        require(
            self.gil_switch_interval_us > 0,
            f"gil_switch_interval_us={self.gil_switch_interval_us} must be > 0",
        )
        require(
            self.high_priority_headroom_blocks >= 0,
            f"high_priority_headroom_blocks={self.high_priority_headroom_blocks} must be >= 0",
        )
        require(
            self.max_waiting_requests is None
            or (isinstance(self.max_waiting_requests, int) and self.max_waiting_requests > 0),
            f"max_waiting_requests={self.max_waiting_requests!r} must be none or an int > 0",
        )
        require(
            self.report_interval_s > 0, f"report_interval_s={self.report_interval_s} must be > 0"
        )
        require(
            self.owner_unreachable_s > 0,
            f"owner_unreachable_s={self.owner_unreachable_s} must be > 0",
        )
        require(self.grace_s >= 0, f"grace_s={self.grace_s} must be >= 0")
        require(
            self.transport_backend in ("ucx", "tcp"),
            f"transport_backend={self.transport_backend!r} must be 'ucx' or 'tcp'",
        )


@dataclass(frozen=True)
class TestHooksConfig:
    """Tests only (loaded with prefix TEST): `LLMESH_TEST_HOOKS` names a module under
    tests/ whose `migration_faults` (a services.worker.migration.faults.FaultHooks) the
    worker process installs at start. Never set in production."""

    __test__ = False  # not a pytest test class

    hooks: str = ""  # dotted module name; empty = no hooks
