"""Client channels with keepalive, default deadlines and trace-context propagation."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

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


def aio_channel(address: str, interceptors=None) -> grpc.aio.Channel:
    """An insecure aio channel to address (host:port) with keepalive and tracing."""
    return grpc.aio.insecure_channel(
        address,
        options=CHANNEL_OPTIONS,
        interceptors=list(interceptors)
        if interceptors is not None
        else default_client_interceptors(),
    )


async def check_health(address: str, service: str = "", timeout: float = 1.0) -> bool:
    """True if address answers grpc.health.v1 Check with SERVING."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = await stub.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.aio.AioRpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING
