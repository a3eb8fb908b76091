"""Gateway configuration: defaults, then LLMESH_GATEWAY_<FIELD> env vars, then flags."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.common.config import require
from services.common.telemetry_config import TelemetryConfig


@dataclass(frozen=True)
class GatewayConfig:
    """Knobs of one gateway process."""

    bind: str = "127.0.0.1:50051"  # host:port of the client API (port 0 = chosen by the OS)
    # host:port of the OpenAI-compatible HTTP API (port 0 = chosen by the OS; "" = off)
    http_bind: str = "127.0.0.1:8000"
    http_max_body_bytes: int = 32 * 2**20  # larger HTTP request bodies get 413
    advertise_address: str = ""  # where workers push outputs; empty = the bound address
    scheduler_address: str = "127.0.0.1:50052"  # global scheduler host:port
    model: str = "tiny"  # model whose tokenizer turns text prompts into ids ("tiny" or a path)
    max_inflight_requests: int = 4096  # admission: more concurrent requests get RESOURCE_EXHAUSTED
    max_waiting_per_instance: int = (
        1024  # admission: refuse when every instance has this many queued
    )
    admission_retry_after_s: float = 1.0  # retry hint sent with an admission refusal
    # Per client key (sha256 of its bearer token, "anonymous" without one; none = off):
    key_max_concurrent: int | None = None  # requests in flight per key
    key_rate_per_s: float | None = None  # requests per second per key (token bucket)
    key_burst: int = 1  # the bucket's size: requests a key may send at once
    max_placements: int = 4  # instances tried per placement before the client gets UNAVAILABLE
    # A request whose worker was lost mid-stream keeps trying to be placed this long when
    # no instance takes it at first (e.g. a KunServe group dissolving after a member died).
    failover_wait_s: float = 10.0
    dispatch_timeout_s: float = 1.0  # deadline of Scheduler.Dispatch
    submit_timeout_s: float = 5.0  # deadline of Worker.Submit
    abort_timeout_s: float = 2.0  # deadline of Worker.Abort
    cluster_view_refresh_s: float = 0.5  # how often the cached cluster view is refreshed
    cluster_view_stale_s: float = 3.0  # older than this, fall back to round robin, not freeness
    cluster_view_forget_s: float = 10.0  # keep an instance this long after the scheduler drops it
    lost_instance_ttl_s: float = 10.0  # avoid an instance this long after it was lost
    health_watch_rotate_s: float = 300.0  # deadline of each worker health Watch (then re-opened)
    # Client API keys (gateway/api_keys.py): a file (one per line, `# comments`, optionally
    # name:key) and/or comma-separated keys; none = client authentication off.
    api_keys_file: str = ""
    api_keys: tuple[str, ...] = ()
    tls_cert: str = ""  # PEM certificate of the client-facing gRPC and HTTP ports (TLS on)
    tls_key: str = ""  # its private key
    # host:port of a separate cluster port (workers push outputs there; advertise_address
    # names it). Empty: with TLS (client or cluster) the bind's host and any port, else
    # none: the client port serves workers too.
    internal_bind: str = ""
    log_level: str = "INFO"  # DEBUG, INFO, WARNING or ERROR
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)  # traces, /metrics
    ready_file: str = ""  # write {"address", "pid"} here once serving (process launchers)
    grace_s: float = 5.0  # graceful-stop grace period

    def __post_init__(self) -> None:
        require(":" in self.bind, f"bind={self.bind!r} must be host:port")
        require(
            self.http_bind == "" or ":" in self.http_bind,
            f"http_bind={self.http_bind!r} must be host:port or empty (no HTTP API)",
        )
        require(
            isinstance(self.http_max_body_bytes, int) and self.http_max_body_bytes > 0,
            f"http_max_body_bytes={self.http_max_body_bytes!r} must be an int > 0",
        )
        require(
            self.advertise_address == "" or ":" in self.advertise_address,
            f"advertise_address={self.advertise_address!r} must be host:port or empty",
        )
        require(
            ":" in self.scheduler_address,
            f"scheduler_address={self.scheduler_address!r} must be host:port",
        )
        require(self.model != "", "model must be 'tiny' or a checkpoint path, got ''")
        for name in ("max_inflight_requests", "max_waiting_per_instance", "max_placements"):
            value = getattr(self, name)
            require(isinstance(value, int) and value > 0, f"{name}={value!r} must be an int > 0")
        for name in (
            "dispatch_timeout_s",
            "submit_timeout_s",
            "abort_timeout_s",
            "cluster_view_refresh_s",
            "cluster_view_stale_s",
            "cluster_view_forget_s",
            "lost_instance_ttl_s",
        ):
            value = getattr(self, name)
            require(value > 0, f"{name}={value!r} must be > 0")
        require(
            self.key_max_concurrent is None
            or (isinstance(self.key_max_concurrent, int) and self.key_max_concurrent > 0),
            f"key_max_concurrent={self.key_max_concurrent!r} must be none or an int > 0",
        )
        require(
            self.key_rate_per_s is None or self.key_rate_per_s > 0,
            f"key_rate_per_s={self.key_rate_per_s!r} must be none or > 0",
        )
        require(
            isinstance(self.key_burst, int) and self.key_burst >= 1,
            f"key_burst={self.key_burst!r} must be an int >= 1",
        )
        require(
            self.admission_retry_after_s > 0,
            f"admission_retry_after_s={self.admission_retry_after_s!r} must be > 0",
        )
        require(self.failover_wait_s >= 0, f"failover_wait_s={self.failover_wait_s!r} must be >= 0")
        require(
            self.health_watch_rotate_s > 0,
            f"health_watch_rotate_s={self.health_watch_rotate_s} must be > 0",
        )
        require(self.grace_s >= 0, f"grace_s={self.grace_s} must be >= 0")
        require(
            self.internal_bind == "" or ":" in self.internal_bind,
            f"internal_bind={self.internal_bind!r} must be host:port or empty",
        )
        require(
            bool(self.tls_cert) == bool(self.tls_key),
            f"tls_cert={self.tls_cert!r} and tls_key={self.tls_key!r}: give both or neither",
        )
