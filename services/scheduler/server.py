"""`serve()`: the global scheduler process, wired together."""

from __future__ import annotations

import asyncio
import contextlib

from protos import scheduler_pb2_grpc
from services.common.grpc_server import GrpcServer
from services.common.logging import get_logger
from services.common.procs import write_ready_file
from services.scheduler.config import SchedulerConfig
from services.scheduler.registry import InstanceRegistry
from services.scheduler.servicer import SchedulerServicer

log = get_logger(__name__)


async def expire_leases(registry: InstanceRegistry, interval_s: float) -> None:
    """Drop instances whose lease ran out, forever."""
    while True:
        await asyncio.sleep(interval_s)
        for instance_id in registry.expire():
            log.warning("instance_lease_expired", instance_id=instance_id, lease_s=registry.lease_s)


async def serve(config: SchedulerConfig, server: GrpcServer | None = None) -> None:
    """Run the scheduler until SIGTERM/SIGINT (or `server.request_stop()`)."""
    registry = InstanceRegistry(lease_s=config.lease_ms / 1000)
    servicer = SchedulerServicer(config, registry)
    server = server or GrpcServer("scheduler", config.bind, grace_s=config.grace_s)
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(servicer, server.server)
    await server.start(service_names=["llmesh.v1.Scheduler"])
    expirer = asyncio.create_task(expire_leases(registry, config.lease_ms / 4000))
    await server.set_serving()
    if config.ready_file:
        write_ready_file(config.ready_file, server.address)
    log.info("scheduler_ready", address=server.address, dispatch_policy=config.dispatch_policy)
    try:
        server.install_signal_handlers()
        await server.wait_for_termination()
    finally:
        expirer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await expirer
        await server.stop()
