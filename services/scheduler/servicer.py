"""gRPC adapter of the global scheduler: protobuf in, registry/policy calls, protobuf out.

Never on the token path: it only sees registrations, load reports and one Dispatch
call per request. KunServe groups (DropGroup / RestoreGroup) go through a GroupControl
(services/scheduler/group_control.py: a GroupTable and the calls to the group's
stage 0), the same one the group loop uses.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Collection

from opentelemetry import trace

from protos import scheduler_pb2, scheduler_pb2_grpc
from services.common.convert import (
    instance_spec_from_proto,
    instance_spec_to_proto,
    load_from_proto,
    load_to_proto,
)
from services.common.convert_groups import group_to_proto
from services.common.errors import NotFoundError, ResourceExhaustedError
from services.common.logging import bind_context, get_logger
from services.common.messages import InstanceSpec
from services.policies import DispatchInfo, make_dispatch_policy
from services.scheduler.config import SchedulerConfig
from services.scheduler.group_control import GroupControl
from services.scheduler.groups import GroupTable
from services.scheduler.registry import InstanceRegistry
from services.scheduler.worker_client import WorkerClient

log = get_logger(__name__)
tracer = trace.get_tracer("llmesh.scheduler")


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(self, config: SchedulerConfig, registry: InstanceRegistry):
        self.config = config
        self.registry = registry
        self.groups = GroupTable(registry)
        self.workers = WorkerClient(config.group_timeout_s)
        # DropGroup / RestoreGroup and the group loop go through this one object.
        self.group_control = GroupControl(self.groups, self.workers, self._draining)
        # `freest` counts a KunServe group at its members' own capacity (weight share).
        self.dispatch_policy = make_dispatch_policy(
            config.dispatch_policy,
            **(
                {"group_weight_share": config.group_weight_share}
                if config.dispatch_policy == "freest"
                else {}
            ),
        )
        # instance id -> commands waiting to go down its StreamLoad stream.
        self._commands: dict[str, asyncio.Queue[scheduler_pb2.SchedulerCommand]] = {}
        self.num_migrations_ordered = 0
        self.dispatch_outcomes = {"dispatched": 0, "no_candidate": 0}  # for the metrics
        # Set by serve() when the scheduler runs its loops (shown in GetClusterState).
        self.migration_policy_name = "none"
        self.scaling_loop = None
        self.group_policy_name = "none"
        self.group_loop = None

    def _draining(self) -> Collection[str]:
        return self.scaling_loop.draining if self.scaling_loop is not None else ()

    async def RegisterInstance(self, request, context):
        spec = instance_spec_from_proto(request.info)
        self.registry.register(spec)
        self.groups.note_registered(spec.instance_id)
        log.info(
            "instance_registered",
            instance_id=spec.instance_id,
            address=spec.address,
            model_id=spec.model_id,
            kernels=spec.kernels,
            layers=f"[{spec.layer_start},{spec.layer_end})",
        )
        return scheduler_pb2.RegisterInstanceResponse(
            lease_ms=round(self.config.lease_s * 1000),
            report_interval_ms=round(self.config.report_interval_s * 1000),
        )

    async def StreamLoad(self, request_iterator, context):
        """Reports in, commands out. The reader runs as its own task so commands can
        be sent while the worker is between reports."""
        queue: asyncio.Queue[scheduler_pb2.SchedulerCommand] = asyncio.Queue()
        instance_ids: list[str] = []

        async def read_reports() -> None:
            async for message in request_iterator:
                instance_id = message.instance_id
                record = self.registry.get(instance_id)
                if record is None:
                    raise NotFoundError(
                        f"instance_id {instance_id!r} is not registered; call RegisterInstance first"
                    )
                if not instance_ids:
                    instance_ids.append(instance_id)
                    self._commands[instance_id] = queue
                self.registry.report(load_from_proto(message, record.spec.block_size))
                self.groups.observe(instance_id)

        reader = asyncio.create_task(read_reports())
        try:
            while True:
                getter = asyncio.create_task(queue.get())
                done, _ = await asyncio.wait({reader, getter}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    yield getter.result()
                    continue
                getter.cancel()
                reader.result()  # re-raises NotFoundError / stream errors
                return
        finally:
            reader.cancel()
            if instance_ids and self._commands.get(instance_ids[0]) is queue:
                del self._commands[instance_ids[0]]

    async def DeregisterInstance(self, request, context):
        if self.registry.deregister(request.instance_id):
            log.info("instance_deregistered", instance_id=request.instance_id)
            self.groups.forget_members([request.instance_id])
        return scheduler_pb2.DeregisterInstanceResponse()

    async def Dispatch(self, request, context):
        with (
            tracer.start_as_current_span("scheduler.dispatch"),
            bind_context(request_id=request.request_id),
        ):
            if request.num_prompt_tokens < 0:
                raise ValueError(f"num_prompt_tokens={request.num_prompt_tokens} must be >= 0")
            info = DispatchInfo(
                request_id=request.request_id,
                num_prompt_tokens=request.num_prompt_tokens,
                priority=request.priority,
                exclude_instance_ids=tuple(request.exclude_instance_ids),
            )
            loads = self.groups.annotate(self.registry.loads())
            instance_id = self.dispatch_policy.choose(loads, info)
            if instance_id is None:
                self.dispatch_outcomes["no_candidate"] += 1
                raise ResourceExhaustedError(
                    f"no instance can take request {request.request_id!r}: "
                    f"{len(self.registry)} registered, excluded {list(request.exclude_instance_ids)}"
                )
            record = self.registry.get(instance_id)
            assert record is not None
            self.dispatch_outcomes["dispatched"] += 1
            block_size = max(record.spec.block_size, 1)
            self.registry.note_dispatch(
                instance_id, request.request_id, math.ceil(request.num_prompt_tokens / block_size)
            )
            log.info(
                "dispatched", instance_id=instance_id, num_prompt_tokens=request.num_prompt_tokens
            )
            return scheduler_pb2.DispatchResponse(
                instance_id=instance_id, address=record.spec.address
            )

    async def GetClusterState(self, request, context):
        scaling = self.scaling_loop
        group_loop = self.group_loop
        registered = [r.spec.instance_id for r in self.registry.records()]
        return scheduler_pb2.ClusterState(
            migration_policy=self.migration_policy_name,
            autoscale=scaling is not None,
            pending_instance_ids=scaling.provisioner.pending(registered) if scaling else [],
            draining_instance_ids=sorted(scaling.draining) if scaling else [],
            num_instances_started=scaling.num_started if scaling else 0,
            num_instances_stopped=scaling.num_stopped if scaling else 0,
            instances=[
                scheduler_pb2.InstanceState(
                    info=instance_spec_to_proto(r.spec),
                    load=load_to_proto(r.report),
                    ms_since_report=self.registry.ms_since_report(r),
                )
                for r in self.registry.records()
            ],
            num_migrations_ordered=self.num_migrations_ordered,
            dispatch_policy=self.dispatch_policy.name,
            groups=[group_to_proto(g) for g in self.groups.groups()],
            group_policy=self.group_policy_name,
            num_groups_dropped=group_loop.num_dropped if group_loop else 0,
            num_groups_restored=group_loop.num_restored if group_loop else 0,
            num_group_operations_failed=group_loop.num_failed if group_loop else 0,
        )

    async def Migrate(self, request, context):
        """Admin: order src to migrate requests to dst (the source's llumlet picks which,
        unless request_id names one). Answers once the order is on the source's stream."""
        for field in ("src_instance_id", "dst_instance_id"):
            if not getattr(request, field):
                raise ValueError(f"{field} must not be empty")
        if request.src_instance_id == request.dst_instance_id:
            raise ValueError("src_instance_id and dst_instance_id must differ")
        if request.num_requests < 0:
            raise ValueError(f"num_requests={request.num_requests} must be >= 0")
        dst = self.registry.get(request.dst_instance_id)
        if self.registry.get(request.src_instance_id) is None or dst is None:
            missing = request.src_instance_id if dst is not None else request.dst_instance_id
            raise NotFoundError(f"instance {missing!r} is not registered")
        ordered = self.order_migration(
            request.src_instance_id, dst.spec, request.num_requests or 1, request.request_id
        )
        return scheduler_pb2.SchedulerMigrateResponse(ordered=ordered)

    async def Drain(self, request, context):
        """Admin: mark an instance terminating (or lift the mark) via its load stream."""
        if not request.instance_id:
            raise ValueError("instance_id must not be empty")
        if self.registry.get(request.instance_id) is None:
            raise NotFoundError(f"instance {request.instance_id!r} is not registered")
        command = scheduler_pb2.SchedulerCommand(
            drain=scheduler_pb2.DrainCommand(is_terminating=request.is_terminating)
        )
        sent = self.send_command(request.instance_id, command)
        log.info(
            "drain_ordered",
            instance_id=request.instance_id,
            is_terminating=request.is_terminating,
            sent=sent,
        )
        return scheduler_pb2.SchedulerDrainResponse(sent=sent)

    async def DropGroup(self, request, context):
        """KunServe: plan the group, have its stage 0 form it, keep it once it serves."""
        dropped = await self.group_control.drop_group(list(request.instance_ids))
        return scheduler_pb2.DropGroupResponse(
            group=group_to_proto(dropped.group), drop_ms=dropped.formed.drop_ms
        )

    async def RestoreGroup(self, request, context):
        """KunServe: have the group's stage 0 restore every member, then forget it."""
        dissolved = await self.group_control.restore_group(request.group_id)
        return scheduler_pb2.RestoreGroupResponse(
            num_requests_moved=dissolved.num_requests_moved,
            num_preempted=dissolved.num_preempted,
            restore_ms=dissolved.restore_ms,
        )

    def order_migration(
        self, src_instance_id: str, dst: InstanceSpec, num_requests: int, request_id: str = ""
    ) -> bool:
        """Send a MigrateCommand down src's load stream; False if it has no stream now."""
        command = scheduler_pb2.SchedulerCommand(
            migrate=scheduler_pb2.MigrateCommand(
                dst_instance_id=dst.instance_id,
                dst_address=dst.address,
                dst_transport_address=dst.transport_address,
                num_requests=num_requests,
                request_id=request_id,
            )
        )
        ordered = self.send_command(src_instance_id, command)
        if ordered:
            self.num_migrations_ordered += 1
            log.info(
                "migration_ordered",
                src_instance_id=src_instance_id,
                dst_instance_id=dst.instance_id,
                num_requests=num_requests,
                request_id=request_id,
            )
        return ordered

    def send_command(self, instance_id: str, command: scheduler_pb2.SchedulerCommand) -> bool:
        """Queue a command for an instance's StreamLoad stream."""
        queue = self._commands.get(instance_id)
        if queue is None:
            return False
        queue.put_nowait(command)
        return True
