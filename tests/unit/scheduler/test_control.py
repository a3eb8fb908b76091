"""The scheduler's control loops, one round at a time, over a real registry."""

from __future__ import annotations

import asyncio
import dataclasses

from protos import scheduler_pb2
from services.common.messages import InstanceSpec, LoadReport
from services.policies import (
    MigrationConfig,
    MigrationPair,
    ScaleAction,
    ScalingConfig,
    make_migration_policy,
    make_scaling_policy,
)
from services.scheduler.control import MigrationLoop, ScalingLoop
from services.scheduler.groups import GroupTable
from services.scheduler.provisioner import Provisioner
from services.scheduler.registry import InstanceRegistry
from tests.clock import FakeClock
from tests.unit.policies.snapshots import load
from tests.unit.scheduler.test_groups import spec as member_spec
from tests.unit.scheduler.test_registry import spec


def registry_with(*loads, clock: FakeClock | None = None, spec_of=spec) -> InstanceRegistry:
    registry = InstanceRegistry(lease_s=3.0, clock=clock or FakeClock())
    for ld in loads:
        registry.register(spec_of(ld.instance_id))
        registry.report(LoadReport(ld, seq=1))
    return registry


def report(registry: InstanceRegistry, ld, seq: int) -> None:
    assert registry.report(LoadReport(ld, seq=seq))


class Orders:
    """Stands in for SchedulerServicer.order_migration / send_command."""

    def __init__(self, reachable: set[str] | None = None) -> None:
        self.reachable = reachable
        self.migrations: list[tuple[str, str, int]] = []
        self.commands: list[tuple[str, scheduler_pb2.SchedulerCommand]] = []

    def order(self, src: str, dst: InstanceSpec, num_requests: int) -> bool:
        if self.reachable is not None and src not in self.reachable:
            return False
        self.migrations.append((src, dst.instance_id, num_requests))
        return True

    def send(self, instance_id: str, command) -> bool:
        if self.reachable is not None and instance_id not in self.reachable:
            return False
        self.commands.append((instance_id, command))
        return True


def migration_loop(registry, orders, hold_s=0.3, groups=None, **config) -> MigrationLoop:
    policy = make_migration_policy("freeness", config=MigrationConfig(**config))
    return MigrationLoop(registry, policy, orders.order, hold_s=hold_s, groups=groups)


# ---- migration loop ------------------------------------------------------------------


def test_migration_round_pairs_the_overloaded_with_the_free_and_holds_both():
    # freeness: a = 2/4 = 0.5 (source), b = 90/2 = 45 (destination), c = 40/4 = 10 (dest).
    registry = registry_with(load("a", 98, 4), load("b", 10, 2), load("c", 60, 4))
    orders = Orders()
    loop = migration_loop(registry, orders)
    assert loop.tick(now=0.0) == [MigrationPair("a", "b", 1)]
    assert orders.migrations == [("a", "b", 1)]
    # Reports still show the old loads, but both ends are held: no second order.
    assert loop.tick(now=0.2) == []
    # After the hold, a still overloaded source gets ordered again.
    assert loop.tick(now=0.3) == [MigrationPair("a", "b", 1)]


def test_migration_round_skips_held_ends_but_pairs_the_rest():
    registry = registry_with(load("a", 98, 4), load("b", 10, 2), load("c", 99, 4), load("d", 20, 2))
    orders = Orders()
    loop = migration_loop(registry, orders)
    # Least free source (c: 0.25) with the freest destination (b: 45); then a with d.
    assert loop.tick(now=0.0) == [MigrationPair("c", "b", 1), MigrationPair("a", "d", 1)]
    registry.register(spec("e"))
    report(registry, load("e", 0, 0), seq=1)
    registry.register(spec("f"))
    report(registry, load("f", 99, 4), seq=1)
    # a, b, c, d are held; the newcomers pair among themselves.
    assert loop.tick(now=0.1) == [MigrationPair("f", "e", 1)]


def test_migration_order_that_cannot_be_sent_holds_nothing():
    registry = registry_with(load("a", 98, 4), load("b", 10, 2))
    orders = Orders(reachable=set())  # a has no open load stream
    loop = migration_loop(registry, orders)
    assert loop.tick(now=0.0) == []
    orders.reachable = {"a"}
    assert loop.tick(now=0.01) == [MigrationPair("a", "b", 1)]


def test_terminating_instances_are_drained_with_more_requests_per_round():
    registry = registry_with(load("a", 10, 3, terminating=True), load("b", 10, 2))
    orders = Orders()
    assert migration_loop(registry, orders).tick(now=0.0) == [MigrationPair("a", "b", 4)]


def test_migrations_pair_only_instances_on_the_same_kernels():
    # freeness: a = 0.25 and c = 0.5 (sources); b = 45, d = 10 (destinations).
    kernels = {"a": "native", "b": "torch", "c": "torch", "d": "native"}
    registry = InstanceRegistry(lease_s=3.0, clock=FakeClock())
    for ld in (load("a", 99, 4), load("b", 10, 2), load("c", 98, 4), load("d", 60, 4)):
        registry.register(
            dataclasses.replace(spec(ld.instance_id), kernels=kernels[ld.instance_id])
        )
        report(registry, ld, seq=1)
    # Paired across backends, a would go to the freest (b) and c to d.
    assert migration_loop(registry, Orders()).tick(now=0.0) == [
        MigrationPair("a", "d", 1),
        MigrationPair("c", "b", 1),
    ]
    registry.deregister("a")
    registry.deregister("b")
    # c's only free peer, d, runs the other kernels: nothing moves.
    assert migration_loop(registry, Orders()).tick(now=1.0) == []


def test_a_balanced_cluster_migrates_nothing():
    registry = registry_with(load("a", 50, 4), load("b", 50, 4))
    assert migration_loop(registry, Orders()).tick(now=0.0) == []


def test_members_of_a_group_still_dropping_are_never_paired():
    # a (freeness 0.5) would go to b (45); the table plans them as a group whose
    # reports do not show it yet, so only c -> d is ordered.
    registry = registry_with(
        load("a", 98, 4), load("b", 10, 2), load("c", 99, 4), load("d", 20, 2), spec_of=member_spec
    )
    groups = GroupTable(registry)
    groups.plan(["a", "b"])
    orders = Orders()
    assert migration_loop(registry, orders, groups=groups).tick(now=0.0) == [
        MigrationPair("c", "d", 1)
    ]
    assert orders.migrations == [("c", "d", 1)]


# ---- scaling loop --------------------------------------------------------------------


class FakeProvisioner(Provisioner):
    """Records starts and stops; instances are pending until "registered"."""

    def __init__(self, owned: set[str] | None = None) -> None:
        self.owned = set(owned or ())
        self.started: list[str] = []
        self.stopped: list[str] = []
        self.closed = False

    def start(self, count):
        ids = [f"auto-{len(self.started) + i}" for i in range(count)]
        self.started += ids
        self.owned.update(ids)
        return ids

    def pending(self, registered):
        return [i for i in self.started if i not in registered and i not in self.stopped]

    def owns(self, instance_id):
        return instance_id in self.owned

    async def stop(self, instance_id):
        self.owned.discard(instance_id)
        self.stopped.append(instance_id)

    async def close(self):
        self.closed = True


SCALING = ScalingConfig(
    scale_up_freeness=10.0, scale_down_freeness=40.0, cooldown_s=5.0, min_instances=1,
    max_instances=4,
)  # fmt: skip


def scaling_loop(registry, provisioner, orders, groups=None) -> ScalingLoop:
    policy = make_scaling_policy("freeness_band", config=SCALING)
    return ScalingLoop(registry, policy, provisioner, orders.send, groups)


async def test_scaling_starts_workers_below_the_band_and_counts_them_pending():
    # (100 - 90) / 10 = 1 < 10: middle of the band is 25: 25*10 + 90 - 100 = 240 blocks
    # = 3 instances of 100 (room: 4 - 1).
    registry = registry_with(load("a", 90, 10))
    provisioner = FakeProvisioner()
    loop = scaling_loop(registry, provisioner, Orders())
    done = await loop.tick(now=0.0)
    assert (done.decision.action, done.started) == (ScaleAction.UP, ["auto-0", "auto-1", "auto-2"])
    assert loop.num_started == 3
    # Cooldown over, still busy, but 3 pending instances would fix it: nothing more.
    done = await loop.tick(now=6.0)
    assert done.decision.action is ScaleAction.NONE
    assert provisioner.started == ["auto-0", "auto-1", "auto-2"]


async def test_scaling_drains_an_owned_idle_instance_then_stops_it_once_empty():
    clock = FakeClock()
    registry = registry_with(load("a", 10, 1), load("auto-0", 5, 1), clock=clock)
    provisioner = FakeProvisioner(owned={"auto-0"})
    orders = Orders()
    loop = scaling_loop(registry, provisioner, orders)
    done = await loop.tick(now=0.0)
    # (200 - 15) / 2 = 92.5; without auto-0: (100 - 15) / 2 = 42.5 > 40. a is not owned.
    assert (done.decision.action, done.draining) == (ScaleAction.DOWN, "auto-0")
    assert [(i, c.WhichOneof("command"), c.drain.is_terminating) for i, c in orders.commands] == [
        ("auto-0", "drain", True)
    ]
    assert loop.draining == {"auto-0": 0.0}
    # Its report does not show the drain yet: not stopped, even though it is empty.
    report(registry, load("auto-0", 0, 0), seq=2)
    assert (await loop.tick(now=1.0)).stopped == []
    # Draining but still running a request: not stopped.
    report(registry, load("auto-0", 5, 1, terminating=True), seq=3)
    assert (await loop.tick(now=2.0)).stopped == []
    # Empty but a migration still in flight: not stopped.
    report(registry, load("auto-0", 0, 0, terminating=True, migrating=1), seq=4)
    assert (await loop.tick(now=3.0)).stopped == []
    # Empty, terminating, nothing in flight: stopped through the provisioner.
    report(registry, load("auto-0", 0, 0, terminating=True), seq=5)
    done = await loop.tick(now=4.0)
    assert done.stopped == ["auto-0"]
    await asyncio.sleep(0)  # the stop runs as a task
    assert provisioner.stopped == ["auto-0"]
    assert (loop.draining, loop.num_stopped) == ({}, 1)
    await loop.close()
    assert provisioner.closed


async def test_a_dispatch_the_reports_do_not_show_yet_keeps_a_drained_instance_alive():
    clock = FakeClock()
    registry = registry_with(load("a", 10, 1), load("auto-0", 5, 1), clock=clock)
    provisioner = FakeProvisioner(owned={"auto-0"})
    loop = scaling_loop(registry, provisioner, Orders())
    assert (await loop.tick(now=0.0)).draining == "auto-0"
    report(registry, load("auto-0", 0, 0, terminating=True), seq=2)
    registry.note_dispatch("auto-0", "late-request", num_blocks=1)
    assert (await loop.tick(now=1.0)).stopped == []
    clock.now = 1.0  # the next report is younger than the dispatch's ttl: pending cleared
    report(registry, load("auto-0", 0, 0, terminating=True), seq=3)
    assert (await loop.tick(now=2.0)).stopped == ["auto-0"]


async def test_instances_not_started_by_the_provisioner_are_never_drained():
    registry = registry_with(load("a", 10, 1), load("b", 0, 0))
    orders = Orders()
    loop = scaling_loop(registry, FakeProvisioner(), orders)
    assert (await loop.tick(now=0.0)).decision.action is ScaleAction.NONE
    assert orders.commands == []


async def test_a_drained_instance_that_vanished_is_forgotten():
    registry = registry_with(load("a", 10, 1), load("auto-0", 0, 0))
    provisioner = FakeProvisioner(owned={"auto-0"})
    loop = scaling_loop(registry, provisioner, Orders())
    assert (await loop.tick(now=0.0)).draining == "auto-0"
    registry.deregister("auto-0")  # e.g. it crashed and its lease expired
    assert (await loop.tick(now=1.0)).stopped == []
    assert loop.draining == {}
    assert provisioner.stopped == []


async def test_an_empty_cluster_scales_up_to_min_instances():
    registry = registry_with()
    provisioner = FakeProvisioner()
    loop = scaling_loop(registry, provisioner, Orders())
    assert (await loop.tick(now=0.0)).started == ["auto-0"]
    # Starting (pending) counts: no second start while it boots.
    assert (await loop.tick(now=0.5)).started == []


async def test_members_of_a_group_are_never_drained():
    # auto-0 (idle, owned) would be the victim; it is stage 1 of a group, so auto-1 goes.
    registry = registry_with(
        load("a", 10, 1), load("auto-0", 0, 0), load("auto-1", 5, 1), spec_of=member_spec
    )
    groups = GroupTable(registry)
    groups.plan(["a", "auto-0"])
    orders = Orders()
    loop = scaling_loop(registry, FakeProvisioner(owned={"auto-0", "auto-1"}), orders, groups)
    assert (await loop.tick(now=0.0)).draining == "auto-1"
    assert [i for i, _ in orders.commands] == ["auto-1"]
