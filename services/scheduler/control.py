"""The scheduler's control loops: live migration pairing, auto-scaling and KunServe
groups.

All run on the scheduler's event loop and read the registry's load snapshots (what
workers reported, plus dispatches their reports cannot show yet). Migration and
scaling act only through commands on the workers' load streams; the group loop acts
through the GroupControl behind the DropGroup / RestoreGroup RPCs.

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
    GroupLoop       every GroupConfig.interval_s: the group policy says which instances
                    drop into a group and which groups restore; each becomes a task
                    calling GroupControl.drop_group / restore_group (what the RPCs
                    call), at most one per instance at a time.

Migration and scaling never touch a KunServe group's members (their requests hold KV
on every member): the loops read the snapshots through the GroupTable, which marks
members whose reports do not show their group yet, and the policies skip members.

`tick()` does one round and returns what it did, so tests drive the loops with a fake
clock; `run()` repeats it forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from opentelemetry import trace

from protos import scheduler_pb2
from services.common.groups import GroupStatus
from services.common.logging import get_logger
from services.common.messages import InstanceSpec
from services.policies import (
    GroupPolicy,
    InstanceLoad,
    MigrationPair,
    MigrationPolicy,
    ScaleAction,
    ScaleDecision,
    ScalingPolicy,
)
from services.scheduler.group_control import GroupControl
from services.scheduler.groups import MATCHING_FIELDS, GroupTable
from services.scheduler.provisioner import Provisioner
from services.scheduler.registry import InstanceRegistry

log = get_logger(__name__)
tracer = trace.get_tracer("llmesh.scheduler")
OnRound = Callable[[str, float], None]  # (loop name, seconds one round took)

# order(src_instance_id, dst spec, num_requests) -> whether the command was queued.
OrderMigration = Callable[..., bool]
# send(instance_id, SchedulerCommand) -> whether the command was queued.
SendCommand = Callable[[str, scheduler_pb2.SchedulerCommand], bool]


def _loads(registry: InstanceRegistry, groups: GroupTable | None) -> list[InstanceLoad]:
    loads = registry.loads()
    return groups.annotate(loads) if groups is not None else loads


async def _repeat(name: str, interval_s: float, tick, on_round: OnRound | None = None) -> None:
    """Call `tick(now)` every interval_s; a failing round is logged, not fatal.
    on_round(name, seconds): each round's duration (the metrics)."""
    while True:
        await asyncio.sleep(interval_s)
        started = time.perf_counter()
        try:
            result = tick(time.monotonic())
            if asyncio.iscoroutine(result):
                await result
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("control_loop_round_failed", loop=name)
        if on_round is not None:
            on_round(name, time.perf_counter() - started)


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

    async def run(self, on_round: OnRound | None = None) -> None:
        await _repeat("migration", self.policy.config.interval_s, self.tick, on_round)


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

    async def run(self, on_round: OnRound | None = None) -> None:
        await _repeat("scaling", self.policy.config.interval_s, self.tick, on_round)

    async def close(self) -> None:
        """Wait for stops in flight, then stop every worker the provisioner started."""
        for task in list(self._stopping):
            with contextlib.suppress(Exception):
                await task
        await self.provisioner.close()


@dataclass
class GroupRound:
    """The group operations one round started (for tests and logs)."""

    drops: list[tuple[str, ...]] = field(default_factory=list)  # members, stage order
    restores: list[str] = field(default_factory=list)  # group ids


class GroupLoop:
    """KunServe drops and restores decided by a group policy.

    One policy instance per class of instances that may group together (same model,
    block size, kernels and layer count: what GroupTable.plan demands), so a policy
    never plans a group the table would refuse and its votes and windows see only
    its class. Instances that cannot join any group (a layer range of their own, no
    data plane) are left out of every policy's snapshots.

    An operation runs as a task, so a slow FormGroup / DissolveGroup (up to
    group_timeout_s) delays neither the rounds nor other groups' operations; while it
    runs its instances are busy and decisions touching them are skipped. A failed
    operation is logged and counted; the policy decides again in later rounds.
    """

    def __init__(
        self,
        registry: InstanceRegistry,
        make_policy: Callable[[], GroupPolicy],
        control: GroupControl,
        interval_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry
        self.make_policy = make_policy  # a fresh policy for each class
        self.control = control
        self.interval_s = interval_s
        self.clock = clock  # when an operation ends (hysteresis counts from there)
        self.policies: dict[tuple, GroupPolicy] = {}  # class key -> its policy
        self._busy: set[str] = set()  # instance ids with an operation in flight
        self._tasks: set[asyncio.Task] = set()
        self.num_dropped = 0
        self.num_restored = 0
        self.num_failed = 0

    def tick(self, now: float) -> GroupRound:
        """One round: decide per class, start the operations whose instances are free."""
        done = GroupRound()
        table = self.control.table
        by_class: dict[tuple, list[InstanceLoad]] = {}
        for load in table.annotate(self.registry.loads()):
            key = self._class_of(load)
            if key is not None:
                by_class.setdefault(key, []).append(load)
        for key in sorted(by_class):
            policy = self.policies.get(key)
            if policy is None:
                policy = self.policies[key] = self.make_policy()
            decision = policy.decide(by_class[key], now)
            log.debug("group_inputs", loads=[_group_inputs(ld) for ld in by_class[key]])
            reasons = iter(decision.reasons)  # one per drop, then one per restore
            for members in decision.drops:
                reason = next(reasons, "")
                if self._busy.intersection(members):
                    continue
                log.info("group_drop_decided", members=list(members), reason=reason)
                self._start(self._drop(policy, members), members)
                done.drops.append(members)
            for group_id in decision.restores:
                reason = next(reasons, "")
                group = table.get(group_id)
                if group is None or group.status is not GroupStatus.SERVING:
                    continue  # still dropping, already restoring, or gone
                members = tuple(m.instance_id for m in group.members)
                if self._busy.intersection(members):
                    continue
                log.info("group_restore_decided", group_id=group_id, reason=reason)
                self._start(self._restore(policy, group_id, members), members)
                done.restores.append(group_id)
        return done

    def _class_of(self, load: InstanceLoad) -> tuple | None:
        """The class of instances that `load`'s instance may group with (None: none)."""
        record = self.registry.get(load.instance_id)
        if record is None:
            return None
        spec = record.spec
        if not load.is_in_group and not _can_join_a_group(spec):
            return None
        return tuple(getattr(spec, name) for name in MATCHING_FIELDS)

    def _start(self, operation, members: Sequence[str]) -> None:
        self._busy.update(members)
        task = asyncio.get_running_loop().create_task(operation)
        self._tasks.add(task)

        def finished(task: asyncio.Task) -> None:
            self._tasks.discard(task)
            self._busy.difference_update(members)

        task.add_done_callback(finished)

    async def _drop(self, policy: GroupPolicy, members: tuple[str, ...]) -> None:
        try:
            dropped = await self.control.drop_group(list(members))
        except Exception as exc:
            self.num_failed += 1
            log.warning("group_loop_drop_failed", members=list(members), error=str(exc))
            return
        self.num_dropped += 1
        policy.note_formed(dropped.group.group_id, self.clock())

    async def _restore(self, policy: GroupPolicy, group_id: str, members: tuple[str, ...]) -> None:
        try:
            await self.control.restore_group(group_id)
        except Exception as exc:
            self.num_failed += 1
            log.warning("group_loop_restore_failed", group_id=group_id, error=str(exc))
            return
        self.num_restored += 1
        policy.note_restored(members, self.clock())

    @property
    def num_in_flight(self) -> int:
        return len(self._tasks)

    async def join(self) -> None:
        """Wait until no operation is in flight."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def run(self, on_round: OnRound | None = None) -> None:
        await _repeat("groups", self.interval_s, self.tick, on_round)

    async def close(self) -> None:
        """Cancel the operations in flight (the workers finish or undo them on their
        own; a restarted scheduler re-learns a group from its members' reports)."""
        for task in list(self._tasks):
            task.cancel()
        await self.join()


def _can_join_a_group(spec: InstanceSpec) -> bool:
    """Every layer and a data plane: what GroupTable.plan checks of a member."""
    return (spec.layer_start, spec.layer_end) == (0, spec.num_layers) and bool(
        spec.transport_address
    )


def _group_inputs(load: InstanceLoad) -> str:
    """What a group policy sees of one instance, in one token (the debug log compares
    a live run's rounds with the simulator's): id:used/total:waiting/waiting_blocks:group."""
    group = load.group_id if load.is_in_group else "-"
    return (
        f"{load.instance_id}:{load.num_used_blocks}/{load.num_total_blocks}"
        f":{load.num_waiting}/{load.num_waiting_blocks}:{group}"
    )
