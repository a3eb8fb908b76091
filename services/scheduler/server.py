"""`serve()`: the global scheduler process, wired together.

gRPC servicer (registration, load streams, dispatch) + lease expiry + the control
loops (services/scheduler/control.py): migration pairing unless
`migration_policy=none`, KunServe drops and restores unless `group_policy=none`,
auto-scaling with a provisioner when `autoscale` is on.
On SIGTERM the loops stop first, then workers the auto-scaler started, then the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools

from protos import scheduler_pb2_grpc
from services.common.grpc_server import GrpcServer
from services.common.logging import get_logger
from services.common.metrics import start_metrics
from services.common.procs import write_ready_file
from services.policies import make_group_policy, make_migration_policy, make_scaling_policy
from services.scheduler.config import SchedulerConfig
from services.scheduler.control import GroupLoop, MigrationLoop, ScalingLoop
from services.scheduler.groups import GroupTable
from services.scheduler.metrics import SchedulerMetrics
from services.scheduler.provisioner import make_provisioner
from services.scheduler.registry import InstanceRegistry
from services.scheduler.servicer import SchedulerServicer

log = get_logger(__name__)


async def expire_leases(
    registry: InstanceRegistry, interval_s: float, groups: GroupTable | None = None
) -> None:
    """Drop instances whose lease ran out, and the KunServe groups they were in, forever."""
    while True:
        await asyncio.sleep(interval_s)
        expired = registry.expire()
        for instance_id in expired:
            log.warning("instance_lease_expired", instance_id=instance_id, lease_s=registry.lease_s)
        if expired and groups is not None:
            groups.forget_members(expired)


def make_migration_loop(
    config: SchedulerConfig, registry: InstanceRegistry, servicer: SchedulerServicer
) -> MigrationLoop | None:
    if config.migration_policy == "none":
        return None
    policy = make_migration_policy(config.migration_policy, config=config.migration_config())
    return MigrationLoop(
        registry,
        policy,
        servicer.order_migration,
        hold_s=config.migration_hold_s,
        groups=servicer.groups,
    )


def make_group_loop(
    config: SchedulerConfig, registry: InstanceRegistry, servicer: SchedulerServicer
) -> GroupLoop | None:
    if config.group_policy == "none":
        return None
    group_config = config.group_config()
    return GroupLoop(
        registry,
        functools.partial(make_group_policy, config.group_policy, config=group_config),
        servicer.group_control,
        interval_s=group_config.interval_s,
    )


def make_scaling_loop(
    config: SchedulerConfig, registry: InstanceRegistry, servicer: SchedulerServicer, address: str
) -> ScalingLoop | None:
    if not config.autoscale:
        return None
    provisioner = make_provisioner(
        config.provisioner,
        address,
        model=config.worker_model,
        host=config.bind.rsplit(":", 1)[0],
        worker_args=config.worker_args,
        log_dir=config.worker_log_dir,
    )
    policy = make_scaling_policy(config.scaling_policy, config=config.scaling_config())
    return ScalingLoop(registry, policy, provisioner, servicer.send_command, servicer.groups)


async def serve(config: SchedulerConfig, server: GrpcServer | None = None) -> None:
    """Run the scheduler until SIGTERM/SIGINT (or `server.request_stop()`)."""
    registry = InstanceRegistry(lease_s=config.lease_s)
    servicer = SchedulerServicer(config, registry)
    server = server or GrpcServer("scheduler", config.bind, grace_s=config.grace_s)
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(servicer, server.server)
    await server.start(service_names=["llmesh.v1.Scheduler"])
    tasks = [asyncio.create_task(expire_leases(registry, config.lease_s / 4, servicer.groups))]
    metrics = SchedulerMetrics(servicer) if config.telemetry.metrics_enabled else None
    on_round = metrics.on_round if metrics is not None else None
    migration = make_migration_loop(config, registry, servicer)
    if migration is not None:
        servicer.migration_policy_name = migration.policy.name
        tasks.append(asyncio.create_task(migration.run(on_round)))
    groups = make_group_loop(config, registry, servicer)
    if groups is not None:
        servicer.group_policy_name = config.group_policy
        servicer.group_loop = groups
        tasks.append(asyncio.create_task(groups.run(on_round)))
    scaling = make_scaling_loop(config, registry, servicer, server.address)
    if scaling is not None:
        servicer.scaling_loop = scaling
        tasks.append(asyncio.create_task(scaling.run(on_round)))
    metrics_endpoint = None
    try:  # whatever fails to start, the loops and the server are stopped
        metrics_endpoint = start_metrics(
            metrics.registry if metrics else None, config.telemetry.metrics_bind
        )
        await server.set_serving()
        if config.ready_file:
            write_ready_file(
                config.ready_file,
                server.address,
                metrics_endpoint.address if metrics_endpoint else "",
            )
        log.info(
            "scheduler_ready",
            address=server.address,
            policy=config.policy,
            dispatch_policy=config.dispatch_policy,
            migration_policy=config.migration_policy,
            group_policy=config.group_policy,
            autoscale=config.autoscale,
        )
        server.install_signal_handlers()
        await server.wait_stop_requested()
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if groups is not None:
            await groups.close()
        if scaling is not None:
            await scaling.close()
        await server.stop()
        if metrics_endpoint is not None:
            metrics_endpoint.stop()
