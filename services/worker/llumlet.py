"""The llumlet: the worker's agent toward the global scheduler (Llumnix).

    register (retry with backoff until the scheduler answers)
      -> StreamLoad: a LoadReport every report interval and whenever the load changed
         (at most every MIN_REPORT_GAP_S), commands come back on the same stream
      -> stream broken (scheduler died or restarted): register again, stream again

It turns engine snapshots into load reports with the policies' load model
(`make_instance_load`), so the scheduler, the gateway's fallback and the simulator all
read the same virtual usage and freeness. The scheduler's commands (drain, migrate)
come back on the load stream and are handed to the worker here.

A snapshot is taken between two steps, and a request that arrives during a step joins
the engine only when the step ends: until a snapshot shows it, a report counts it as a
waiting request (`Intake`). Otherwise a worker in a long step (a 512-token prefill chunk
takes about a second on a shared CPU) reported an empty queue again and again, the
scheduler forgot the dispatches it had sent there (its pending entries last 0.5 s,
services/scheduler/registry.py) and sent it more requests than its pool holds.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

import grpc

from protos import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from services.common.convert import instance_spec_to_proto, load_to_proto
from services.common.grpc_client import DEFAULT_TIMEOUT_S, aio_channel
from services.common.logging import get_logger
from services.common.messages import InstanceSpec, LoadReport
from services.policies import (
    InstanceLoad,
    LoadModelConfig,
    add_pending_dispatches,
    make_instance_load,
)
from services.worker.async_engine import EngineSnapshot

log = get_logger(__name__)

MIN_REPORT_GAP_S = 0.025
REGISTER_BACKOFF_S = (0.1, 2.0)  # first retry, longest wait


def load_from_snapshot(
    instance_id: str,
    snapshot: EngineSnapshot,
    config: LoadModelConfig,
    block_size: int,
    is_terminating: bool = False,
    num_migrating: int = 0,
    group_id: str = "",
    group_stage: int = 0,
) -> InstanceLoad:
    stats = snapshot.stats
    running = sorted(snapshot.running, key=lambda r: (r.num_tokens, r.request_id))  # shortest first
    return make_instance_load(
        instance_id,
        num_total_blocks=stats.num_total_blocks,
        num_used_blocks=stats.num_used_blocks,
        num_running=stats.num_running,
        num_waiting=stats.num_waiting,
        num_hol_blocks=stats.num_hol_blocks,
        num_waiting_blocks=snapshot.num_waiting_blocks,
        num_running_high_priority=stats.num_running_high_priority,
        is_terminating=is_terminating,
        num_migrating=num_migrating,
        num_preemptions=stats.num_preemptions,
        running=[(r.request_id, r.num_tokens, r.num_blocks, r.priority) for r in running],
        block_size=block_size,
        group_id=group_id,
        group_stage=group_stage,
        config=config,
    )


class Intake:
    """Requests that reached the worker but that no engine snapshot shows yet.

    `arrived` when the worker takes a request and before it hands it to the engine
    thread, `admitted` with the engine thread's clock once the engine has it (between
    two steps), `refused` if it never got in. `unreported(taken_at)` is what a report
    built from a snapshot taken at `taken_at` must add: every request not admitted yet
    and every one admitted after that snapshot. `forget_before(taken_at)` drops what
    the llumlet's own snapshot shows now.
    """

    def __init__(self) -> None:
        self._entries: dict[str, tuple[int, float | None]] = {}  # id -> (blocks, admitted_at)
        self._arrived: list[str] = []  # since the last report to the scheduler
        self.version = 0  # changes whenever a report would read differently

    def __len__(self) -> int:
        return len(self._entries)

    def arrived(self, request_id: str, num_blocks: int) -> None:
        self._entries[request_id] = (num_blocks, None)
        self._arrived.append(request_id)
        self.version += 1

    def take_arrived(self) -> list[str]:
        """The requests that arrived since the last call (the next report names them:
        the scheduler stops counting them as pending dispatches)."""
        arrived, self._arrived = self._arrived, []
        return arrived

    def admitted(self, request_id: str, at: float) -> None:
        entry = self._entries.get(request_id)
        if entry is not None:
            self._entries[request_id] = (entry[0], at)

    def refused(self, request_id: str) -> None:
        if self._entries.pop(request_id, None) is not None:
            self.version += 1

    def unreported(self, taken_at: float) -> tuple[int, int]:
        """(requests, blocks) a snapshot taken at `taken_at` does not show."""
        shown = [n for n, at in self._entries.values() if at is None or at >= taken_at]
        return len(shown), sum(shown)

    def forget_before(self, taken_at: float) -> None:
        """Forget the requests admitted before a snapshot taken at `taken_at`."""
        for request_id in [
            i for i, (_, at) in self._entries.items() if at is not None and at < taken_at
        ]:
            del self._entries[request_id]


@dataclass(frozen=True)
class GroupReport:
    """What a load report says of this instance's KunServe group and layers."""

    group_id: str = ""
    group_stage: int = 0
    layer_start: int = 0
    layer_end: int = 0
    freed_weight_bytes: int = 0


class Llumlet:
    def __init__(
        self,
        spec: InstanceSpec,
        scheduler_address: str,
        load_config: LoadModelConfig,
        initial_snapshot: EngineSnapshot,
        report_interval_s: float,
    ) -> None:
        self.spec = spec
        self.scheduler_address = scheduler_address
        self.load_config = load_config
        self.report_interval_s = report_interval_s
        self.is_terminating = False
        self.num_migrating = 0
        self.group = GroupReport(layer_start=spec.layer_start, layer_end=spec.layer_end)
        self.is_registered = False
        self._snapshot = initial_snapshot
        self._snapshot_version = 0
        self.intake = Intake()
        self._seq = 0
        self._changed = asyncio.Event()
        # on_migrate(MigrateCommand): the worker runs a migration the scheduler ordered.
        self.on_migrate = None
        self._channel = aio_channel(scheduler_address)
        self._stub = scheduler_pb2_grpc.SchedulerStub(self._channel)

    def set_group(self, group: GroupReport) -> None:
        """The instance joined or left a KunServe group (or its layers changed)."""
        self.group = group
        self._changed.set()

    def set_num_migrating(self, num_migrating: int) -> None:
        self.num_migrating = num_migrating
        self._changed.set()

    def note_arrived(self, request_id: str, num_tokens: int) -> None:
        """A request reached the worker (reported as waiting until a snapshot shows it)."""
        self.intake.arrived(request_id, -(-num_tokens // max(self.spec.block_size, 1)))
        self._changed.set()

    def note_admitted(self, request_id: str, at: float) -> None:
        """The engine took it at `at` (time.monotonic() on the engine thread)."""
        self.intake.admitted(request_id, at)

    def note_refused(self, request_id: str) -> None:
        self.intake.refused(request_id)
        self._changed.set()

    def on_snapshot(self, snapshot: EngineSnapshot) -> None:
        """A new engine snapshot (from the engine thread's per-step callback)."""
        self._snapshot = snapshot
        self.intake.forget_before(snapshot.taken_at)
        self._snapshot_version += 1
        self._changed.set()

    def next_report(self, snapshot: EngineSnapshot | None = None) -> LoadReport:
        """The next report: `snapshot` (default: the latest, plus the requests that
        reached the worker since: the intake) through the load model. A snapshot given
        here (Worker.GetLoad's, taken just now) is reported as the engine has it."""
        self._seq += 1
        with_intake = snapshot is None
        snapshot = snapshot or self._snapshot
        load = load_from_snapshot(
            self.spec.instance_id,
            snapshot,
            self.load_config,
            self.spec.block_size,
            self.is_terminating,
            self.num_migrating,
            self.group.group_id,
            self.group.group_stage,
        )
        if with_intake:
            load = add_pending_dispatches(load, *self.intake.unreported(snapshot.taken_at))
        g = self.group
        return LoadReport(
            load,
            self._seq,
            layer_start=g.layer_start,
            layer_end=g.layer_end,
            freed_weight_bytes=g.freed_weight_bytes,
        )

    async def run(self) -> None:
        """Register and stream load reports until cancelled."""
        backoff_s = REGISTER_BACKOFF_S[0]
        while True:
            try:
                reply = await self._stub.RegisterInstance(
                    scheduler_pb2.RegisterInstanceRequest(info=instance_spec_to_proto(self.spec)),
                    timeout=DEFAULT_TIMEOUT_S,
                )
                if reply.report_interval_ms > 0:
                    self.report_interval_s = reply.report_interval_ms / 1000
                self.is_registered = True
                backoff_s = REGISTER_BACKOFF_S[0]
                log.info("registered", scheduler=self.scheduler_address, lease_ms=reply.lease_ms)
                call = self._stub.StreamLoad(self._reports())
                async for command in call:
                    self._on_command(command)
                log.warning("load_stream_closed_by_scheduler")
            except grpc.aio.AioRpcError as exc:
                if self.is_registered:
                    log.warning("scheduler_lost", code=exc.code().name, details=exc.details())
                self.is_registered = False
            await asyncio.sleep(backoff_s)
            backoff_s = min(backoff_s * 2, REGISTER_BACKOFF_S[1])

    async def _reports(self):
        """A report now, then one per report interval, or sooner when the load changed
        (but never more often than MIN_REPORT_GAP_S)."""
        loop = asyncio.get_running_loop()
        cached_key, cached = None, None
        while True:
            self._changed.clear()
            # A heartbeat with nothing new reuses the last report (64 running requests
            # make building one cost more than copying it); only seq changes.
            key = (
                self._snapshot_version,
                self.intake.version,
                self.is_terminating,
                self.num_migrating,
                self.group,
            )
            if key != cached_key:
                cached_key, cached = key, load_to_proto(self.next_report())
                report = cached
            else:
                self._seq += 1
                report = common_pb2.LoadReport()
                report.CopyFrom(cached)
                report.seq = self._seq
            # Named once: a heartbeat that copies this report must not name them again.
            arrived = self.intake.take_arrived()
            if arrived:
                if report is cached:
                    report = common_pb2.LoadReport()
                    report.CopyFrom(cached)
                report.arrived_request_ids.extend(arrived)
            yield report
            sent_at = loop.time()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), self.report_interval_s)
            gap_s = MIN_REPORT_GAP_S - (loop.time() - sent_at)
            if gap_s > 0:
                await asyncio.sleep(gap_s)

    def _on_command(self, command: scheduler_pb2.SchedulerCommand) -> None:
        kind = command.WhichOneof("command")
        if kind == "drain":
            self.is_terminating = command.drain.is_terminating
            self._changed.set()
            log.info("drain_command", is_terminating=self.is_terminating)
        elif kind == "migrate" and self.on_migrate is not None:
            migrate = command.migrate
            log.info(
                "migrate_command",
                dst_instance_id=migrate.dst_instance_id,
                request_id=migrate.request_id,
                num_requests=migrate.num_requests,
            )
            self.on_migrate(migrate)
        else:
            log.warning("scheduler_command_not_supported", command=kind)

    async def deregister(self, timeout_s: float = 2.0) -> None:
        """Leave the registry at once (graceful shutdown) instead of waiting for the lease."""
        with contextlib.suppress(grpc.aio.AioRpcError):
            await self._stub.DeregisterInstance(
                scheduler_pb2.DeregisterInstanceRequest(instance_id=self.spec.instance_id),
                timeout=timeout_s,
            )

    async def close(self) -> None:
        await self._channel.close()
