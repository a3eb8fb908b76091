"""gRPC aio server bootstrap shared by every llmesh service.

    server = GrpcServer("scheduler", "127.0.0.1:0")
    add_SchedulerServicer_to_server(servicer, server.server)
    await server.start(service_names=["llmesh.v1.Scheduler"])   # health NOT_SERVING
    server.set_serving()                                         # when ready
    await server.wait_for_termination()                          # SIGTERM/SIGINT -> graceful stop

Every server gets standard health checking (grpc.health.v1), reflection, keepalive,
and the interceptors in services.common.interceptors (trace context, error mapping).
Cluster authentication is always on and comes first: every method outside health,
reflection and `public_services` needs a cluster member's signature
(services.common.auth_interceptors), and with cluster mTLS configured the port is TLS
requiring a certificate from the cluster CA (unless `credentials` says otherwise).
"""

from __future__ import annotations

import asyncio
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common import cluster_auth
from services.common.auth_interceptors import cluster_auth_interceptor
from services.common.interceptors import default_server_interceptors
from services.common.logging import get_logger

log = get_logger(__name__)

# Keepalive: ping idle connections so a dead peer is noticed in seconds, and allow
# clients to ping us at the rate services.common.grpc_client uses.
SERVER_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.so_reuseport", 0),
]


CLUSTER = "cluster"  # GrpcServer(credentials=CLUSTER): the cluster's mTLS, when configured


def cluster_credentials() -> grpc.ServerCredentials | None:
    """Server credentials of an internal port: cluster mTLS, or None (plaintext)."""
    tls = cluster_auth.current().tls
    return tls.server_credentials() if tls is not None else None


class HealthServicer(health.aio.HealthServicer):
    """grpc's aio health servicer plus `List` (in grpc.health.v1 since 1.63, not
    implemented by grpcio-health-checking: it would answer INTERNAL)."""

    async def List(self, request, context) -> health_pb2.HealthListResponse:
        return health_pb2.HealthListResponse(
            statuses={
                name: health_pb2.HealthCheckResponse(status=status)
                for name, status in self._server_status.items()
            }
        )


class GrpcServer:
    """One aio server with health, reflection and graceful shutdown."""

    def __init__(
        self,
        service: str,
        bind: str,
        interceptors=None,
        grace_s: float = 5.0,
        *,
        public_services: tuple[str, ...] = (),
        credentials: grpc.ServerCredentials | None | str = CLUSTER,
    ):
        """`public_services` need no cluster credentials (guard them yourself, first in
        `interceptors`); `credentials` of the port: CLUSTER (cluster mTLS when configured,
        else plaintext), None (plaintext) or the port's own (the gateway's client TLS)."""
        self.service = service
        self.bind = bind
        self.grace_s = grace_s
        self._credentials = cluster_credentials() if credentials == CLUSTER else credentials
        chain = [cluster_auth_interceptor(public_services)]
        chain += list(interceptors) if interceptors is not None else default_server_interceptors()
        self.server = grpc.aio.server(interceptors=chain, options=SERVER_OPTIONS)
        self.health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port: int = 0
        self._service_names: list[str] = []
        self._stopped = asyncio.Event()
        self._is_stopped = False

    @property
    def address(self) -> str:
        host = self.bind.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    def bind_port(self) -> str:
        """Bind now (before servicers that need the address are built); returns host:port.

        Servicers must be added before `start()` (gRPC only registers method handlers
        on a server that has not started), so bind first when they need the address.
        """
        if self.port == 0:
            self.port = (
                self.server.add_secure_port(self.bind, self._credentials)
                if self._credentials is not None
                else self.server.add_insecure_port(self.bind)
            )
            if self.port == 0:
                raise OSError(f"{self.service}: could not bind {self.bind}")
        return self.address

    def add_cluster_port(self, bind: str) -> str:
        """A second port for cluster members (cluster mTLS or plaintext), serving the same
        services: where the gateway's workers push outputs when its client port has its
        own TLS. Before `start()`; returns host:port."""
        credentials = cluster_credentials()
        port = (
            self.server.add_secure_port(bind, credentials)
            if credentials is not None
            else self.server.add_insecure_port(bind)
        )
        if port == 0:
            raise OSError(f"{self.service}: could not bind {bind}")
        return f"{bind.rsplit(':', 1)[0]}:{port}"

    async def start(self, service_names: list[str]) -> None:
        """Bind, enable reflection for service_names, start with health NOT_SERVING."""
        self._service_names = list(service_names)
        reflection.enable_server_reflection(
            [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server
        )
        self.bind_port()
        await self.server.start()
        await self._set_all(health_pb2.HealthCheckResponse.NOT_SERVING)
        log.info("grpc_server_started", address=self.address, services=service_names)

    async def _set_all(self, status) -> None:
        for name in ["", *self._service_names]:
            await self.health.set(name, status)

    async def set_serving(self, serving: bool = True) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await self._set_all(status)

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopped.set)

    def request_stop(self) -> None:
        self._stopped.set()

    async def wait_stop_requested(self) -> None:
        """Block until SIGTERM/SIGINT or request_stop() (the caller then stops in order)."""
        await self._stopped.wait()

    async def wait_for_termination(self) -> None:
        """Block until SIGTERM/SIGINT or request_stop(), then stop gracefully."""
        await self._stopped.wait()
        await self.stop()

    async def stop(self) -> None:
        """Health NOT_SERVING, then let in-flight RPCs finish for grace_s. Idempotent."""
        if self._is_stopped:
            return
        self._is_stopped = True
        log.info("grpc_server_stopping", grace_s=self.grace_s)
        await self._set_all(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(self.grace_s)
        self._stopped.set()
