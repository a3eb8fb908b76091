"""TransportConfig: every knob of the data plane, validated once.

Environment variables are not read here: UCX reads its own `UCX_*` variables (UCX_TLS,
UCX_NET_DEVICES, ...) when a transport starts, and options given in `ucx_options` win
over them. The one the UCX backend looks at itself is UCX_RNDV_THRESH, when it creates
its context: set, it wins over the threshold chosen here (ucx.py). Nothing here writes
the environment. See docs/kvtransport.md for the settings to use per deployment.
Validation raises services.common.config.ConfigError (a ValueError), as every config's
does; that module is torch-free and imports nothing from the services.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from kvtransport.frame_auth import mac_bytes
from services.common.config import ConfigError, require

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB


class Backend(StrEnum):
    """Which wire carries the bytes."""

    UCX = "ucx"  # ucxx: shared memory / CMA on one host, TCP or RDMA between hosts
    TCP = "tcp"  # asyncio sockets, for platforms without UCX


class SchedulingPolicy(StrEnum):
    """How a sender orders messages to one peer."""

    PRIORITY = "priority"  # activations first; KV in chunks that yield at every boundary
    FIFO = "fifo"  # submission order, one transfer after the other (baseline only)


@dataclass(frozen=True)
class TransportConfig:
    backend: Backend = Backend.UCX
    """Wire implementation; UCX is the default and the one benchmarked."""
    scheduling: SchedulingPolicy = SchedulingPolicy.PRIORITY
    """Send ordering per peer; FIFO exists to measure what priority buys."""
    kv_chunk_bytes: int = 4 * MIB
    """KV payload per message; a chunk boundary is where activations overtake KV."""
    kv_chunk_bytes_with_activations: int = 512 * KIB
    """KV payload per message of transfers that start while activations flow through the
    transport (see activation_quiet_s); never more than kv_chunk_bytes. The receiver
    copies a chunk in one go (UCX: one CMA read inside one progress call), so this is
    what an activation can find ahead of it, on either side's event loop."""
    kv_window: int = 2
    """KV chunks in flight per peer; more hides latency, fewer preempts sooner."""
    kv_window_with_activations: int = 1
    """KV chunks in flight per peer while activations flow through the transport: an
    activation then finds at most this many chunks ahead of it on the wire, which the
    receiver copies before it reads the activation."""
    activation_quiet_s: float = 0.1
    """Activations flow through a transport while one was sent or received less than this
    long ago: meanwhile new KV transfers use kv_chunk_bytes_with_activations, the KV
    window is kv_window_with_activations, and UCX progress runs in short slices that
    end at each completion; 0 never does any of it."""
    inline_max_bytes: int = 64 * KIB
    """Transfers up to this size travel inside their header (one message, no chunks)."""
    max_header_bytes: int = 64 * KIB
    """Largest encoded header (tensor list + metadata) a receiver accepts."""
    num_mailbox_slots: int = 8
    """Receives kept posted for headers and control messages."""
    recv_timeout_s: float = 30.0
    """Default deadline of `recv` when the caller gives none; there is no infinite wait."""
    send_timeout_s: float = 30.0
    """A message the peer has not taken this long after it was issued fails its peer."""
    unclaimed_timeout_s: float = 30.0
    """A transfer announced but never `recv`-ed this long is rejected back to its sender."""
    cancel_grace_s: float = 5.0
    """How long a cancel waits for chunks already in flight before failing the peer."""
    tombstone_ttl_s: float = 120.0
    """How long a cancelled or abandoned transfer id is remembered (late messages are dropped)."""
    recv_pool_max_bytes: int = 1 * GIB
    """Idle receive buffers kept for reuse; 0 disables pooling."""
    ucx_peer_error_handling: bool = False
    """UCX peer error handling. True restricts UCX to TCP on one host (~0.6 GB/s instead of
    ~5 GB/s through shared memory/CMA), so liveness comes from the control plane instead."""
    ucx_options: tuple[tuple[str, str], ...] = ()
    """Extra UCX context options without the UCX_ prefix, e.g. (("TLS", "tcp"),)."""
    tcp_host: str = "127.0.0.1"
    """TCP backend: address to listen on (0.0.0.0 = every interface)."""
    tcp_port: int = 0
    """TCP backend: port to listen on; 0 lets the OS choose."""
    tcp_advertise_address: str = ""
    """TCP backend: host:port peers connect to (behind NAT or a port mapping); empty =
    the bound address, with a wildcard host replaced by this host's name."""
    cluster_secret: bytes = field(default=b"", repr=False)
    """The cluster secret: control frames are sealed with its HMAC and frames that fail
    are dropped (kvtransport/frame_auth.py); empty = unsealed (transports built outside
    a worker). Every transport of a cluster must use the same."""

    def __post_init__(self) -> None:
        # Accept the plain strings a config file or CLI flag would carry.
        object.__setattr__(self, "backend", _enum(Backend, self.backend, "backend"))
        object.__setattr__(
            self, "scheduling", _enum(SchedulingPolicy, self.scheduling, "scheduling")
        )
        _check_range("kv_chunk_bytes", self.kv_chunk_bytes, 4 * KIB, 1 * GIB)
        _check_range(
            "kv_chunk_bytes_with_activations",
            self.kv_chunk_bytes_with_activations,
            4 * KIB,
            1 * GIB,
        )
        _check_range("kv_window", self.kv_window, 1, 64)
        _check_range("kv_window_with_activations", self.kv_window_with_activations, 1, 64)
        require(
            isinstance(self.activation_quiet_s, int | float) and self.activation_quiet_s >= 0,
            f"activation_quiet_s must be a number of seconds >= 0, got {self.activation_quiet_s!r}",
        )
        _check_range("inline_max_bytes", self.inline_max_bytes, 0, 16 * MIB)
        _check_range("max_header_bytes", self.max_header_bytes, 4 * KIB, 16 * MIB)
        _check_range("num_mailbox_slots", self.num_mailbox_slots, 2, 1024)
        _check_range("recv_pool_max_bytes", self.recv_pool_max_bytes, 0, 1 << 50)
        _check_range("tcp_port", self.tcp_port, 0, 65535)
        for name in (
            "recv_timeout_s",
            "send_timeout_s",
            "unclaimed_timeout_s",
            "cancel_grace_s",
            "tombstone_ttl_s",
        ):
            value = getattr(self, name)
            require(
                isinstance(value, int | float) and value > 0,
                f"{name} must be a positive number of seconds, got {value!r}",
            )
        require(bool(self.tcp_host), f"tcp_host must be a non-empty address, got {self.tcp_host!r}")
        require(
            self.tcp_advertise_address == "" or ":" in self.tcp_advertise_address,
            f"tcp_advertise_address must be host:port or empty, got {self.tcp_advertise_address!r}",
        )
        for pair in self.ucx_options:
            require(
                len(pair) == 2 and all(isinstance(part, str) for part in pair),
                f"ucx_options entries must be (name, value) strings, got {pair!r}",
            )
            require(
                not pair[0].startswith("UCX_"),
                f"ucx_options names go without the UCX_ prefix, got {pair[0]!r}",
            )

    @property
    def mailbox_slot_bytes(self) -> int:
        """Size of one posted header receive: the largest header plus an inline payload."""
        return self.max_header_bytes + self.inline_max_bytes + mac_bytes(self.cluster_secret)


def _enum(enum_type, value, name: str):
    try:
        return enum_type(value)
    except ValueError:
        choices = ", ".join(repr(member.value) for member in enum_type)
        raise ConfigError(f"{name} must be one of {choices}, got {value!r}") from None


def _check_range(name: str, value, low: int, high: int) -> None:
    require(
        not isinstance(value, bool) and isinstance(value, int) and low <= value <= high,
        f"{name} must be an integer in [{low}, {high}], got {value!r}",
    )
