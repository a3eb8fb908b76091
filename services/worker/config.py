"""Worker configuration: defaults, then LLMESH_WORKER_<FIELD> env vars, then flags."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.config import require
from services.worker.engine import EngineConfig
from services.worker.migration.config import MigrationConfig

MiB = 1024 * 1024


@dataclass(frozen=True)
class WorkerConfig:
    """Knobs of one worker process (its engine's included)."""

    bind: str = "127.0.0.1:0"  # host:port of the Worker API (port 0 = chosen by the OS)
    advertise_address: str = ""  # address peers use to reach it; empty = the bound address
    scheduler_address: str = "127.0.0.1:50052"  # global scheduler host:port
    instance_id: str = ""  # stable id; empty = "worker-<random>" chosen at start
    model: str = "tiny"  # "tiny" (embedded) or a local HF checkpoint directory
    dtype: str = "float32"  # weights, activations and KV
    device: str = "cpu"  # torch device
    block_size: int = 16  # tokens per KV block
    memory_capacity_mb: int = 256  # weights + KV pool, in MiB
    num_kv_blocks: int = 0  # exact KV pool size; 0 = all that fits in the capacity
    max_num_seqs: int = 64  # most requests in the running batch
    max_num_batched_tokens: int = 512  # token budget per engine step
    max_model_len: int = 0  # context limit; 0 = the model's
    torch_threads: int = 0  # torch intra-op threads; 0 = torch's default
    # How long the engine thread may hold the GIL while the gRPC/migration event loop
    # waits for it (Python's default is 5000 us). Every handoff on the control path
    # (load reports, output pushes, migration stages and commit) can wait this long.
    gil_switch_interval_us: int = 500
    enable_defrag: bool = True  # count the head-of-line request's demand in virtual usage
    high_priority_headroom_blocks: int = 0  # headroom reserved per running high-priority request
    report_interval_ms: int = 50  # load report period (the scheduler's reply overrides it)
    owner_unreachable_s: float = 10.0  # abort a gateway's requests when it is unreachable this long
    log_level: str = "INFO"  # DEBUG, INFO, WARNING or ERROR
    otlp_endpoint: str = ""  # OTLP/gRPC trace collector (empty = traces not exported)
    ready_file: str = ""  # write {"address", "pid"} here once serving (process launchers)
    grace_s: float = 5.0  # graceful-stop grace period
    transport_backend: str = "ucx"  # data plane for KV: "ucx" (default) or "tcp" (fallback)
    migration_selection: str = "lowest_priority_first"  # which running requests migrate first
    migration_last_stage_max_blocks: int = 2  # stop-and-copy once this few blocks remain
    migration_lease_ms: int = 3000  # a reservation whose source is silent this long is freed
    migration_transfer_timeout_s: float = 20.0  # per-stage data-plane deadline
    migration_stage_chunk_mib: float = 16.0  # blocks travel in transfers of at most this
    migration_max_incoming: int = 4  # concurrent incoming migrations accepted
    # Fault injection for tests only: "pause_before_commit" or "pause_before_stage:N" makes
    # the source log `migration_fault_paused` and sleep there (a test then kills a process).
    migration_fault: str = ""
    migration_fault_pause_s: float = 60.0  # how long a fault pause lasts

    def __post_init__(self) -> None:
        require(":" in self.bind, f"bind={self.bind!r} must be host:port")
        require(
            self.advertise_address == "" or ":" in self.advertise_address,
            f"advertise_address={self.advertise_address!r} must be host:port or empty",
        )
        require(
            ":" in self.scheduler_address,
            f"scheduler_address={self.scheduler_address!r} must be host:port",
        )
        require(
            self.memory_capacity_mb > 0, f"memory_capacity_mb={self.memory_capacity_mb} must be > 0"
        )
        require(self.num_kv_blocks >= 0, f"num_kv_blocks={self.num_kv_blocks} must be >= 0")
        require(self.max_model_len >= 0, f"max_model_len={self.max_model_len} must be >= 0")
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
            self.report_interval_ms > 0, f"report_interval_ms={self.report_interval_ms} must be > 0"
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
        require(
            self.migration_stage_chunk_mib > 0,
            f"migration_stage_chunk_mib={self.migration_stage_chunk_mib} must be > 0",
        )
        self.migration_config()  # validates the migration fields
        self.engine_config()  # the engine validates its own fields

    def migration_config(self) -> MigrationConfig:
        return MigrationConfig(
            last_stage_max_blocks=self.migration_last_stage_max_blocks,
            lease_ms=self.migration_lease_ms,
            transfer_timeout_s=self.migration_transfer_timeout_s,
            stage_chunk_bytes=max(1, int(self.migration_stage_chunk_mib * MiB)),
            max_incoming=self.migration_max_incoming,
            fault=self.migration_fault,
            fault_pause_s=self.migration_fault_pause_s,
        )

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            model=self.model,
            dtype=self.dtype,
            device=self.device,
            block_size=self.block_size,
            memory_capacity_bytes=self.memory_capacity_mb * MiB,
            num_kv_blocks=self.num_kv_blocks or None,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_model_len=self.max_model_len or None,
        )
