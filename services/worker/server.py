"""`serve()`: the worker process, wired together.

bind (health NOT_SERVING) -> load the engine (off the event loop) -> start the engine
thread -> SERVING -> register with the scheduler and stream load reports
SIGTERM -> NOT_SERVING (gateways move its requests) -> deregister -> give requests
up -> stop the engine thread -> stop the server
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import uuid

import torch

from kvtransport import TransportConfig, make_transport
from protos import worker_pb2_grpc
from services.common import cluster_auth
from services.common.addresses import advertised_address, split_host_port
from services.common.grpc_server import GrpcServer
from services.common.logging import get_logger
from services.common.messages import InstanceSpec
from services.common.metrics import start_metrics
from services.common.procs import write_ready_file
from services.policies import LoadModelConfig
from services.worker.async_engine import take_snapshot
from services.worker.config import WorkerConfig
from services.worker.engine import LLMEngine
from services.worker.instance import WorkerInstance
from services.worker.kunserve.faults import NO_GROUP_FAULTS, GroupFaultHooks
from services.worker.llumlet import Llumlet
from services.worker.metrics import WorkerMetrics
from services.worker.migration import MigrationTarget
from services.worker.migration.faults import NO_FAULTS, FaultHooks
from services.worker.servicer import WorkerServicer

log = get_logger(__name__)


def instance_spec(
    config: WorkerConfig,
    engine: LLMEngine,
    instance_id: str,
    address: str,
    transport_address: bytes,
) -> InstanceSpec:
    model = engine.model_config
    eos = engine.eos_token_id
    return InstanceSpec(
        instance_id=instance_id,
        address=address,
        model_id=config.engine.model,
        block_size=engine.config.block_size,
        num_layers=model.num_layers,
        layer_start=engine.layer_start,
        layer_end=engine.layer_end,
        max_model_len=engine.max_model_len,
        vocab_size=model.vocab_size,
        eos_token_id=-1 if eos is None else eos,
        memory_capacity_bytes=engine.config.memory_capacity_bytes,
        transport_address=transport_address,
        transport_backend=config.transport_backend,
        kernels=engine.kernels,
    )


def transport_config(config: WorkerConfig) -> TransportConfig:
    """The data plane's config: the backend, and where the TCP backend listens and what
    it advertises (UCX picks its interfaces from UCX_NET_DEVICES, read by UCX itself)."""
    host, port = split_host_port(config.transport_bind)
    return TransportConfig(
        backend=config.transport_backend,
        tcp_host=host or "0.0.0.0",
        tcp_port=int(port),
        tcp_advertise_address=config.transport_advertise_address,
        cluster_secret=cluster_auth.current().secret,  # control frames sealed, HELLO checked
    )


async def serve(
    config: WorkerConfig,
    server: GrpcServer | None = None,
    faults: FaultHooks = NO_FAULTS,
    group_faults: GroupFaultHooks = NO_GROUP_FAULTS,
) -> None:
    """Run one worker until SIGTERM/SIGINT (or `server.request_stop()`). `faults` are
    the migration fault hooks tests install (none by default)."""
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    sys.setswitchinterval(config.gil_switch_interval_us / 1e6)

    instance_id = config.instance_id or f"worker-{uuid.uuid4().hex[:8]}"
    server = server or GrpcServer("worker", config.bind, grace_s=config.grace_s)
    servicer = WorkerServicer()
    worker_pb2_grpc.add_WorkerServicer_to_server(servicer, server.server)
    await server.start(service_names=["llmesh.v1.Worker"])
    server.install_signal_handlers()
    address = advertised_address(server.address, config.advertise_address)
    instance = await _start_instance(config, instance_id, address, faults, group_faults)
    servicer.instance = instance
    metrics_endpoint = None
    if instance.metrics is not None:
        instance.metrics.watch(instance.metrics_view)
        try:  # before SERVING and the first report: a failure here leaves nothing behind
            metrics_endpoint = start_metrics(
                instance.metrics.registry, config.telemetry.metrics_bind
            )
        except BaseException:
            await _stop(server, instance, None)
            raise
    await server.set_serving()
    reporter = asyncio.create_task(instance.llumlet.run())
    if config.ready_file:
        write_ready_file(
            config.ready_file, address, metrics_endpoint.address if metrics_endpoint else ""
        )
    engine = instance.async_engine.engine
    log.info(
        "worker_ready",
        address=address,
        instance_id=instance_id,
        num_kv_blocks=engine.block_manager.num_total_blocks,
        max_model_len=engine.max_model_len,
    )
    try:
        await server.wait_stop_requested()
    finally:
        await _stop(server, instance, reporter)
        if metrics_endpoint is not None:
            metrics_endpoint.stop()


async def _start_instance(
    config: WorkerConfig,
    instance_id: str,
    address: str,
    faults: FaultHooks,
    group_faults: GroupFaultHooks,
) -> WorkerInstance:
    """Load the engine (off the event loop), start the data plane, the engine thread
    and live migration; the llumlet is built but does not report yet."""
    log.info("engine_loading", model=config.engine.model, instance_id=instance_id)
    engine = await asyncio.to_thread(LLMEngine.from_config, config.engine)
    transport = make_transport(transport_config(config))
    await transport.start()
    llumlet = Llumlet(
        instance_spec(config, engine, instance_id, address, transport.address),
        config.scheduler_address,
        LoadModelConfig(
            enable_defrag=config.enable_defrag,
            high_priority_headroom_blocks=config.high_priority_headroom_blocks,
        ),
        take_snapshot(engine),
        report_interval_s=config.report_interval_s,
    )
    metrics = (
        WorkerMetrics(instance_id, config.engine.model)
        if config.telemetry.metrics_enabled
        else None
    )
    instance = WorkerInstance(
        engine,
        llumlet,
        config.owner_unreachable_s,
        metrics,
        config.max_waiting_requests,
        step_log=config.step_log,
    )
    instance.start()
    migration = instance.attach_migration(transport, config.migration, faults)
    instance.attach_kunserve(transport, config.kunserve, group_faults)
    llumlet.on_migrate = lambda command: migration.migrate_out_soon(
        MigrationTarget(
            command.dst_instance_id, command.dst_address, command.dst_transport_address
        ),
        command.request_id,
        command.num_requests,
    )
    return instance


async def _stop(
    server: GrpcServer, instance: WorkerInstance, reporter: asyncio.Task | None
) -> None:
    """NOT_SERVING (gateways move its requests), deregister, give requests up, stop
    (reporter None: it never started reporting)."""
    await server.set_serving(False)
    if reporter is not None:
        reporter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reporter
    await instance.llumlet.deregister()
    await instance.stop()
    await server.stop()
    await instance.llumlet.close()
