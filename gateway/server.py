"""`serve()`: the gateway process, wired together."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

import grpc
import prometheus_client
from starlette.responses import Response

from gateway.admission import AdmissionControl
from gateway.api_keys import PUBLIC_SERVICES, ApiKeys, api_key_interceptor, load_api_keys
from gateway.cluster_view import ClusterView, refresh_forever
from gateway.config import GatewayConfig
from gateway.dispatcher import Dispatcher, LostInstances
from gateway.generations import Generations, PlacementSettings
from gateway.http_api.app import build_app
from gateway.http_api.chat_template import load_chat_template
from gateway.http_api.server import HttpServer
from gateway.key_limits import KeyLimits
from gateway.resume import Resumer
from gateway.servicer import GatewayServicer, OutputSinkServicer
from gateway.sessions import SessionTable
from gateway.telemetry import GatewayMetrics
from gateway.workers import WorkerPool
from protos import gateway_pb2_grpc, scheduler_pb2_grpc
from services.common import cluster_auth
from services.common.addresses import advertised_address
from services.common.cluster_tls import server_tls_from_paths
from services.common.grpc_client import aio_channel
from services.common.grpc_server import CLUSTER, GrpcServer
from services.common.interceptors import default_server_interceptors
from services.common.logging import get_logger
from services.common.metrics import start_metrics
from services.common.procs import write_ready_file
from services.common.tokenizer import load_tokenizer

log = get_logger(__name__)


@dataclass
class _Gateway:
    """The gateway's parts, wired to each other but not yet serving."""

    scheduler_channel: grpc.aio.Channel
    scheduler_stub: scheduler_pb2_grpc.SchedulerStub
    view: ClusterView
    sessions: SessionTable
    pool: WorkerPool
    generations: Generations
    servicer: GatewayServicer
    sink: OutputSinkServicer


def _build(
    config: GatewayConfig, tokenizer, owner_address: str, metrics: GatewayMetrics | None
) -> _Gateway:
    scheduler_channel = aio_channel(config.scheduler_address)
    scheduler_stub = scheduler_pb2_grpc.SchedulerStub(scheduler_channel)
    view = ClusterView(forget_after_s=config.cluster_view_forget_s)
    lost = LostInstances(ttl_s=config.lost_instance_ttl_s)
    sessions = SessionTable()

    def on_lost(instance_id: str, reason: str) -> None:
        lost.add(instance_id)
        sessions.on_instance_lost(instance_id, reason)

    pool = WorkerPool(
        on_lost,
        submit_timeout_s=config.submit_timeout_s,
        abort_timeout_s=config.abort_timeout_s,
        watch_rotate_s=config.health_watch_rotate_s,
    )
    sessions.on_moved = pool.link  # watch a migration's destination like any worker in use
    dispatcher = Dispatcher(
        scheduler_stub,
        view,
        lost,
        timeout_s=config.dispatch_timeout_s,
        view_stale_s=config.cluster_view_stale_s,
    )
    generations = Generations(
        sessions=sessions,
        view=view,
        dispatcher=dispatcher,
        pool=pool,
        admission=AdmissionControl(
            config.max_inflight_requests,
            config.max_waiting_per_instance,
            config.admission_retry_after_s,
        ),
        key_limits=KeyLimits(
            max_concurrent=config.key_max_concurrent,
            rate_per_s=config.key_rate_per_s,
            burst=config.key_burst,
            retry_after_s=config.admission_retry_after_s,
        ),
        tokenizer=tokenizer,
        placement=PlacementSettings(owner_address, config.max_placements, config.failover_wait_s),
        model_id=config.model,
        metrics=metrics,
    )
    resumer = Resumer(
        sessions=sessions,
        view=view,
        dispatcher=dispatcher,
        pool=pool,
        placement=PlacementSettings(owner_address, config.max_placements, config.failover_wait_s),
    )
    servicer = GatewayServicer(generations, model_id=config.model, resumer=resumer)
    sink = OutputSinkServicer(sessions, pool)
    return _Gateway(
        scheduler_channel, scheduler_stub, view, sessions, pool, generations, servicer, sink
    )


async def serve(config: GatewayConfig, server: GrpcServer | None = None) -> None:
    """Run the gateway until SIGTERM/SIGINT (or `server.request_stop()`)."""
    tokenizer = load_tokenizer(config.model)
    api_keys = load_api_keys(config.api_keys, config.api_keys_file)
    # The client port has the gateway's own TLS (or none); with TLS on either side, or
    # an internal_bind, workers push outputs to a second port with the cluster's
    # credentials (cluster mTLS or plaintext; always the cluster signature).
    client_tls = server_tls_from_paths(config.tls_cert, config.tls_key)
    separate = (
        bool(config.internal_bind)
        or client_tls is not None
        or cluster_auth.current().tls is not None
    )
    server = server or GrpcServer(
        "gateway",
        config.bind,
        [*([api_key_interceptor(api_keys)] if api_keys else []), *default_server_interceptors()],
        grace_s=config.grace_s,
        public_services=PUBLIC_SERVICES,
        credentials=client_tls if separate else CLUSTER,
    )
    client_address = server.bind_port()
    if separate:
        host = config.bind.rsplit(":", 1)[0]
        internal = server.add_cluster_port(config.internal_bind or f"{host}:0")
    owner_address = advertised_address(
        internal if separate else client_address, config.advertise_address
    )
    metrics = GatewayMetrics(config.model) if config.telemetry.metrics_enabled else None
    gateway = _build(config, tokenizer, owner_address, metrics)
    gateway_pb2_grpc.add_GatewayServicer_to_server(gateway.servicer, server.server)
    gateway_pb2_grpc.add_OutputSinkServicer_to_server(gateway.sink, server.server)
    await server.start(service_names=["llmesh.v1.Gateway", "llmesh.v1.OutputSink"])
    refresher = asyncio.create_task(
        refresh_forever(
            gateway.view,
            gateway.scheduler_stub,
            interval_s=config.cluster_view_refresh_s,
            timeout_s=config.dispatch_timeout_s,
        )
    )
    http = metrics_endpoint = None
    try:  # whatever fails to start, what did start is stopped
        metrics_endpoint = start_metrics(
            metrics.registry if metrics else None, config.telemetry.metrics_bind
        )
        http = await _start_http(config, gateway, tokenizer, metrics, api_keys)
        await server.set_serving()
        if config.ready_file:
            extra = {"http_address": http.address} if http is not None else {}
            metrics_address = metrics_endpoint.address if metrics_endpoint else ""
            write_ready_file(config.ready_file, server.address, metrics_address, **extra)
        log.info(
            "gateway_ready",
            address=server.address,
            http_address=http.address if http is not None else "",
            owner_address=owner_address,
            scheduler=config.scheduler_address,
            client_auth="on" if api_keys else "off",
            tls="on" if config.tls_cert else "off",
        )
        server.install_signal_handlers()
        await server.wait_stop_requested()
    finally:
        await _stop(server, http, gateway, refresher, config.grace_s)
        if metrics_endpoint is not None:
            metrics_endpoint.stop()


async def _start_http(
    config: GatewayConfig,
    gateway: _Gateway,
    tokenizer,
    metrics: GatewayMetrics | None,
    api_keys: ApiKeys | None,
) -> HttpServer | None:
    """The OpenAI-compatible API on the same loop and request path (None when off);
    its GET /metrics serves the gateway's registry too, when metrics are on."""
    if not config.http_bind:
        return None
    app = build_app(
        gateway.generations,
        load_chat_template(config.model, tokenizer),
        model_id=config.model,
        max_body_bytes=config.http_max_body_bytes,
        metrics=(lambda: _metrics_page(metrics.registry)) if metrics else None,
        api_keys=api_keys,
    )
    tls = (config.tls_cert, config.tls_key) if config.tls_cert else None
    http = HttpServer(app, config.http_bind, grace_s=config.grace_s, tls=tls)
    await http.start()
    return http


async def _stop(
    server: GrpcServer,
    http: HttpServer | None,
    gateway: _Gateway,
    refresher: asyncio.Task,
    grace_s: float,
) -> None:
    # In-flight streams (gRPC and HTTP) get the grace period (their tokens still arrive
    # over the output sinks); the sinks close once they are done.
    await asyncio.gather(
        server.stop(),
        http.stop() if http is not None else asyncio.sleep(0),
        _close_sinks_when_drained(gateway, grace_s),
    )
    refresher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await refresher
    await gateway.pool.close()
    await gateway.scheduler_channel.close()


async def _close_sinks_when_drained(gateway: _Gateway, grace_s: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(gateway.sessions.wait_empty(), grace_s)
    gateway.sink.close()


def _metrics_page(registry) -> Response:
    """The registry in Prometheus's text format (0.0.4, the `llmesh:` names kept)."""
    return Response(
        prometheus_client.generate_latest(registry),
        media_type=prometheus_client.CONTENT_TYPE_LATEST,
    )
