"""The scheduler's control loops: live migration pairing and auto-scaling.

Both run on the scheduler's event loop and read the registry's load snapshots (what
workers reported, plus dispatches their reports cannot show yet); both act only
through commands on the workers' load streams, so a worker is never called from here.

    MigrationLoop   every MigrationConfig.interval_s: the pairing policy picks
                    (overloaded source, free destination) pairs; each becomes a
                    MigrateCommand to the source, whose llumlet picks the requests
                    (selection policy) and migrates them live. Both ends are then left
                    alone for `hold_s`, since their reports lag the migration.
    ScalingLoop     every ScalingConfig.interval_s: the scaling policy says up (the
                    provisioner starts workers), down (a DrainCommand marks the victim
                    terminating: infinite virtual usage, so dispatch avoids it and the
                    migration loop drains it) or nothing. A terminating instance that
                    reports itself empty is stopped through the provisioner.

Neither touches a KunServe group's members (their requests hold KV on every member):
both read the snapshots through the GroupTable, which marks members whose reports do
not show their group yet, and the policies skip members.

`tick()` does one round and returns what it did, so tests drive the loops with a fake
clock; `run()` repeats it forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from opentelemetry import trace

from protos import scheduler_pb2
from services.common.logging import get_logger
from services.policies import (
    InstanceLoad,
    MigrationPair,
    MigrationPolicy,
    ScaleAction,
    ScaleDecision,
    ScalingPolicy,
)
from services.scheduler.groups import GroupTable
from services.scheduler.provisioner import Provisioner
from services.scheduler.registry import InstanceRegistry

log = get_logger(__name__)
tracer = trace.get_tracer("llmesh.scheduler")

# order(src_instance_id, dst spec, num_requests) -> whether the command was queued.
OrderMigration = Callable[..., bool]
# send(instance_id, SchedulerCommand) -> whether the command was queued.
SendCommand = Callable[[str, scheduler_pb2.SchedulerCommand], bool]


def _loads(registry: InstanceRegistry, groups: GroupTable | None) -> list[InstanceLoad]:
    loads = registry.loads()
    return groups.annotate(loads) if groups is not None else loads


async def _repeat(name: str, interval_s: float, tick) -> None:
    """Call `tick(now)` every interval_s; a failing round is logged, not fatal."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            result = tick(time.monotonic())
            if asyncio.iscoroutine(result):
                await result
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("control_loop_round_failed", loop=name)


class MigrationLoop:
    """Periodic migration pairing over the registry's snapshots."""

    def __init__(
        self,
        registry: InstanceRegistry,
        policy: MigrationPolicy,
        order: OrderMigration,
        hold_s: float = 0.3,
        groups: GroupTable | None = None,
    ) -> None:
        self.registry = registry
        self.policy = policy
        self.order = order
        self.hold_s = hold_s
        self.groups = groups
        self._held_until: dict[str, float] = {}

    def tick(self, now: float) -> list[MigrationPair]:
        """One pairing round; returns the pairs whose command reached the source.

        The policy pairs within each group of instances on the same kernel backend
        only: a request moved to the other backend would not continue the tokens it
        would have produced unmoved (the destination would refuse it anyway)."""
        self._held_until = {i: t for i, t in self._held_until.items() if t > now}
        loads = [
            ld
            for ld in _loads(self.registry, self.groups)
            if ld.instance_id not in self._held_until
        ]
        pairs = [
            pair
            for group in group_by_kernels(loads, self._kernels_of)
            for pair in self.policy.pair(group)
        ]
        ordered = []
        for pair in pairs:
            dst = self.registry.get(pair.dst_instance_id)
            if dst is None or not self.order(pair.src_instance_id, dst.spec, pair.num_requests):
                continue
            ordered.append(pair)
            for instance_id in (pair.src_instance_id, pair.dst_instance_id):
                self._held_until[instance_id] = now + self.hold_s
        return ordered

    def _kernels_of(self, instance_id: str) -> str:
        record = self.registry.get(instance_id)
        return record.spec.kernels if record is not None else ""

    async def run(self) -> None:
        await _repeat("migration", self.policy.config.interval_s, self.tick)


def group_by_kernels(
    loads: list[InstanceLoad], kernels_of: Callable[[str], str]
) -> list[list[InstanceLoad]]:
    """`loads` split by their instance's kernel backend, in backend-name order."""
    groups: dict[str, list[InstanceLoad]] = {}
    for load in loads:
        groups.setdefault(kernels_of(load.instance_id), []).append(load)
    return [groups[kernels] for kernels in sorted(groups)]


@dataclass
class ScalingRound:
    """What one scaling round did (for tests and logs)."""

    decision: ScaleDecision
    started: list[str] = field(default_factory=list)
    draining: str | None = None
    stopped: list[str] = field(default_factory=list)


class ScalingLoop:
    """Auto-scaling through a provisioner."""

    def __init__(
        self,
        registry: InstanceRegistry,
        policy: ScalingPolicy,
        provisioner: Provisioner,
        send_command: SendCommand,
        groups: GroupTable | None = None,
    ) -> None:
        self.registry = registry
        self.policy = policy
        self.provisioner = provisioner
        self.send_command = send_command
        self.groups = groups
        self.draining: dict[str, float] = {}  # instance id -> when it was told to drain
        self._stopping: set[asyncio.Task] = set()
        self.num_started = 0
        self.num_stopped = 0

    async def tick(self, now: float) -> ScalingRound:
        registered = [r.spec.instance_id for r in self.registry.records()]
        pending = self.provisioner.pending(registered)
        stopped = self._stop_drained()
        loads = _loads(self.registry, self.groups)
        removable = {i for i in registered if self.provisioner.owns(i)}
        decision = self.policy.decide(loads, now, len(pending), removable)
        done = ScalingRound(decision, stopped=stopped)
        if decision.action is ScaleAction.UP:
            with tracer.start_as_current_span("scheduler.scale_up") as span:
                done.started = self.provisioner.start(decision.num_instances)
                span.set_attribute("llmesh.instances", len(done.started))
            self.num_started += len(done.started)
            log.info(
                "scale_up",
                reason=decision.reason,
                started=done.started,
                num_instances=len(registered),
                num_pending=len(pending),
            )
        elif decision.action is ScaleAction.DOWN and decision.instance_id is not None:
            command = scheduler_pb2.SchedulerCommand(
                drain=scheduler_pb2.DrainCommand(is_terminating=True)
            )
            if self.send_command(decision.instance_id, command):
                self.draining[decision.instance_id] = now
                done.draining = decision.instance_id
                log.info("scale_down", instance_id=decision.instance_id, reason=decision.reason)
            else:
                log.warning("scale_down_not_sent", instance_id=decision.instance_id)
        return done

    def _stop_drained(self) -> list[str]:
        """Stop draining instances whose reports say they are empty."""
        stopped = []
        for instance_id in list(self.draining):
            record = self.registry.get(instance_id)
            if record is None:  # gone already (stopped, crashed, lease expired)
                del self.draining[instance_id]
                continue
            load = record.report.load
            empty = (load.num_running, load.num_waiting, load.num_migrating) == (0, 0, 0)
            if load.is_terminating and empty and not record.pending:
                del self.draining[instance_id]
                stopped.append(instance_id)
                self.num_stopped += 1
                log.info("drained_instance_stopping", instance_id=instance_id)
                task = asyncio.get_running_loop().create_task(self.provisioner.stop(instance_id))
                self._stopping.add(task)
                task.add_done_callback(self._stopping.discard)
        return stopped

    async def run(self) -> None:
        await _repeat("scaling", self.policy.config.interval_s, self.tick)

    async def close(self) -> None:
        """Wait for stops in flight, then stop every worker the provisioner started."""
        for task in list(self._stopping):
            with contextlib.suppress(Exception):
                await task
        await self.provisioner.close()
