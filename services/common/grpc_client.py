"""Client channels with keepalive, default deadlines and trace-context propagation.

Every internal channel carries this process's cluster credentials
(services.common.cluster_auth): each call is signed with the cluster secret, and with
cluster mTLS configured the channel is TLS with this process's certificate. Use
`aio_channel` in services and `cluster_channel` for a blocking one (operator commands,
tests, benches); never a bare `grpc.insecure_channel` to an internal port.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common import cluster_auth
from services.common.auth_interceptors import (
    SyncMetadata,
    aio_metadata_interceptors,
    cluster_signature,
)
from services.common.interceptors import default_client_interceptors

CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    # Reconnect quickly after a peer restarts (default backoff grows to 120 s). Not
    # grpc.min_reconnect_backoff_ms: gRPC also takes it as each connection attempt's
    # timeout, and a loaded host can need more than a fraction of a second for the
    # handshake ("connection attempt timed out before receiving SETTINGS frame").
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]

# Default deadline for unary control-plane calls, in seconds. Streams set their own.
DEFAULT_TIMEOUT_S = 5.0


def channel_credentials() -> grpc.ChannelCredentials | None:
    """Cluster mTLS credentials of this process, or None (plaintext + signed calls)."""
    tls = cluster_auth.current().tls
    return tls.channel_credentials() if tls is not None else None


def _aio(address: str, options, interceptors) -> grpc.aio.Channel:
    credentials = channel_credentials()
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
    return grpc.aio.secure_channel(address, credentials, options=options, interceptors=interceptors)


def aio_channel(address: str, interceptors=None) -> grpc.aio.Channel:
    """An aio channel to address (host:port) with keepalive, tracing and cluster auth."""
    chain = aio_metadata_interceptors(cluster_signature(cluster_auth.current().secret))
    chain += list(interceptors) if interceptors is not None else default_client_interceptors()
    return _aio(address, CHANNEL_OPTIONS, chain)


def cluster_channel(address: str, options=None) -> grpc.Channel:
    """A blocking channel to an internal port, every call signed as a cluster member."""
    credentials = channel_credentials()
    options = CHANNEL_OPTIONS if options is None else options
    base = (
        grpc.insecure_channel(address, options=options)
        if credentials is None
        else grpc.secure_channel(address, credentials, options=options)
    )
    signature = cluster_signature(cluster_auth.current().secret)
    return grpc.intercept_channel(base, SyncMetadata(signature))


async def check_health(address: str, service: str = "", timeout: float = 1.0) -> bool:
    """True if address answers grpc.health.v1 Check with SERVING (no secret needed; the
    channel is TLS when cluster mTLS is on)."""
    async with _aio(address, None, None) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = await stub.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.aio.AioRpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING
