"""The group loop, one round at a time: a real registry, GroupTable and GroupControl
(the code behind DropGroup / RestoreGroup) over stand-in stage-0 calls."""

from __future__ import annotations

import asyncio
import dataclasses

from services.common.errors import UnavailableError
from services.common.groups import GroupSpec, GroupStatus
from services.common.messages import LoadReport
from services.policies import GroupConfig, GroupDecision, GroupPolicy, make_group_policy
from services.scheduler.config import SchedulerConfig
from services.scheduler.control import GroupLoop, GroupRound
from services.scheduler.group_control import GroupControl
from services.scheduler.groups import GroupTable
from services.scheduler.registry import InstanceRegistry
from services.scheduler.server import make_group_loop
from services.scheduler.servicer import SchedulerServicer
from services.scheduler.worker_client import DissolvedGroup, FormedGroup
from tests.clock import FakeClock
from tests.unit.policies.snapshots import load
from tests.unit.scheduler.test_control import registry_with
from tests.unit.scheduler.test_groups import spec


class FakeWorkers:
    """Stands in for WorkerClient: records each FormGroup / DissolveGroup (the group's
    member ids in stage order); fails with `error`, or waits for `gate` first."""

    def __init__(self) -> None:
        self.formed: list[tuple[str, ...]] = []
        self.dissolved: list[str] = []
        self.error: Exception | None = None
        self.gate: asyncio.Event | None = None

    async def _wait(self) -> None:
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error

    async def form_group(self, group: GroupSpec) -> FormedGroup:
        self.formed.append(tuple(m.instance_id for m in group.members))
        await self._wait()
        return FormedGroup(330, 200, 1000, 0, 12.5)

    async def dissolve_group(self, group: GroupSpec) -> DissolvedGroup:
        self.dissolved.append(group.group_id)
        await self._wait()
        return DissolvedGroup(0, 0, 40.0)


class ScriptedPolicy(GroupPolicy):
    """Returns the decisions a test queues (then nothing); records what it saw and
    the notes it got."""

    name = "scripted"

    def __init__(self) -> None:
        super().__init__(GroupConfig())
        self.decisions: list[GroupDecision] = []
        self.seen: list[list[str]] = []  # instance ids per decide()
        self.formed: list[tuple[str, float]] = []
        self.restored: list[tuple[tuple[str, ...], float]] = []

    def decide(self, loads, now):
        self.seen.append([ld.instance_id for ld in loads])
        return self.decisions.pop(0) if self.decisions else GroupDecision()

    def note_formed(self, group_id, now):
        self.formed.append((group_id, now))

    def note_restored(self, member_ids, now):
        self.restored.append((tuple(member_ids), now))


def drops(*groups: tuple[str, ...]) -> GroupDecision:
    return GroupDecision(drops=groups, reasons=tuple(f"drop {g}" for g in groups))


def restores(*group_ids: str) -> GroupDecision:
    return GroupDecision(restores=group_ids, reasons=tuple(f"restore {g}" for g in group_ids))


@dataclasses.dataclass
class Setup:
    loop: GroupLoop
    table: GroupTable
    workers: FakeWorkers
    clock: FakeClock
    policies: list[ScriptedPolicy]


def setup(*instance_ids: str, spec_of=spec, make_policy=None) -> Setup:
    clock = FakeClock(100.0)
    registry = registry_with(*(load(i) for i in instance_ids), clock=clock, spec_of=spec_of)
    table = GroupTable(registry)
    workers = FakeWorkers()
    policies: list[ScriptedPolicy] = []

    def scripted() -> ScriptedPolicy:
        policies.append(ScriptedPolicy())
        return policies[-1]

    loop = GroupLoop(
        registry,
        make_policy or scripted,
        GroupControl(table, workers),
        interval_s=0.25,
        clock=clock,
    )
    return Setup(loop, table, workers, clock, policies)


async def test_a_drop_decision_forms_the_group_through_the_rpc_path_and_notes_it():
    s = setup("a", "b", "c")
    s.loop.tick(now=100.0)  # the class's policy exists from the first round on
    (policy,) = s.policies
    policy.decisions.append(drops(("b", "a")))
    assert s.loop.tick(now=100.25) == GroupRound(drops=[("b", "a")])
    s.clock.now = 100.5  # stage 0 answers later
    await s.loop.join()
    assert s.workers.formed == [("b", "a")]
    (group,) = s.table.groups()
    assert (group.group_id, group.status, group.num_group_blocks) == (
        "group-0",
        GroupStatus.SERVING,
        330,
    )
    assert [m.instance_id for m in group.members] == ["b", "a"]
    assert policy.formed == [("group-0", 100.5)]
    assert (s.loop.num_dropped, s.loop.num_restored, s.loop.num_failed) == (1, 0, 0)
    # The policy saw every instance, the new members as a group (annotated by the table).
    assert policy.seen == [["a", "b", "c"], ["a", "b", "c"]]


async def test_a_restore_decision_dissolves_the_group_and_notes_its_members():
    s = setup("a", "b")
    s.loop.tick(now=0.0)
    (policy,) = s.policies
    policy.decisions += [drops(("a", "b")), restores("group-0")]
    s.loop.tick(now=1.0)
    await s.loop.join()
    assert s.loop.tick(now=2.0) == GroupRound(restores=["group-0"])
    s.clock.now = 2.5
    await s.loop.join()
    assert s.workers.dissolved == ["group-0"]
    assert s.table.groups() == []
    assert policy.restored == [(("a", "b"), 2.5)]
    assert (s.loop.num_dropped, s.loop.num_restored, s.loop.num_failed) == (1, 1, 0)


async def test_no_two_operations_overlap_on_an_instance():
    s = setup("a", "b", "c", "d")
    s.loop.tick(now=0.0)
    (policy,) = s.policies
    s.workers.gate = asyncio.Event()
    policy.decisions.append(drops(("a", "b")))
    assert s.loop.tick(now=1.0) == GroupRound(drops=[("a", "b")])
    # Before the first drop even started: a and b are busy, c and d are free.
    policy.decisions.append(drops(("a", "c"), ("c", "d")))
    assert s.loop.tick(now=1.1) == GroupRound(drops=[("c", "d")])
    assert s.loop.num_in_flight == 2
    # A restore of a group still dropping is not started (nor tried).
    await asyncio.sleep(0)
    policy.decisions.append(restores("group-0"))
    assert s.loop.tick(now=1.2) == GroupRound()
    s.workers.gate.set()
    await s.loop.join()
    assert s.workers.formed == [("a", "b"), ("c", "d")]
    assert [g.status for g in s.table.groups()] == [GroupStatus.SERVING] * 2
    # One restore at a time per group, however often the policy asks.
    s.workers.gate = asyncio.Event()
    policy.decisions += [restores("group-0"), restores("group-0"), restores("group-0")]
    assert s.loop.tick(now=2.0) == GroupRound(restores=["group-0"])
    assert s.loop.tick(now=2.1) == GroupRound()
    await asyncio.sleep(0)  # the restore began: the table says RESTORING
    assert s.table.get("group-0").status is GroupStatus.RESTORING
    assert s.loop.tick(now=2.2) == GroupRound()
    s.workers.gate.set()
    await s.loop.join()
    assert s.workers.dissolved == ["group-0"]
    assert [g.group_id for g in s.table.groups()] == ["group-1"]


async def test_failed_operations_are_counted_and_leave_the_instances_free():
    s = setup("a", "b")
    s.loop.tick(now=0.0)
    (policy,) = s.policies
    s.workers.error = UnavailableError("stage 0 unreachable")
    policy.decisions.append(drops(("a", "b")))
    s.loop.tick(now=1.0)
    await s.loop.join()
    assert (s.loop.num_dropped, s.loop.num_failed, policy.formed) == (0, 1, [])
    assert s.table.groups() == []
    # A bad plan (the table refuses it) fails the same way, without a call to stage 0.
    policy.decisions.append(drops(("a", "ghost")))
    s.loop.tick(now=1.5)
    await s.loop.join()
    assert (s.workers.formed, s.loop.num_failed) == ([("a", "b")], 2)
    # The instances are free again: the next decision goes through.
    s.workers.error = None
    policy.decisions.append(drops(("a", "b")))
    assert s.loop.tick(now=2.0) == GroupRound(drops=[("a", "b")])
    await s.loop.join()
    assert policy.formed == [("group-1", 100.0)]
    # A failed restore: the group serves on, and can be restored later.
    s.workers.error = UnavailableError("stage 1 gone")
    policy.decisions.append(restores("group-1"))
    s.loop.tick(now=3.0)
    await s.loop.join()
    assert (s.loop.num_restored, s.loop.num_failed, policy.restored) == (0, 3, [])
    assert s.table.get("group-1").status is GroupStatus.SERVING
    s.workers.error = None
    policy.decisions.append(restores("group-1"))
    assert s.loop.tick(now=4.0) == GroupRound(restores=["group-1"])
    await s.loop.join()
    assert s.workers.dissolved == ["group-1", "group-1"]
    assert (s.loop.num_restored, s.loop.num_failed) == (1, 3)
    assert len(s.policies) == 1  # one policy for the class, kept across rounds


async def test_each_class_of_groupable_instances_has_its_own_policy():
    other = {"c": {"model_id": "other"}, "d": {"model_id": "other"}, "e": {"layer_end": 2}}

    def spec_of(instance_id: str):
        return spec(instance_id, **other.get(instance_id, {}))

    s = setup("a", "b", "c", "d", "e", "f", spec_of=spec_of)
    s.table.registry.register(dataclasses.replace(spec("f"), transport_address=b""))
    s.loop.tick(now=0.0)
    # e holds only some layers and f has no data plane: neither can join a group.
    assert sorted(p.seen[0] for p in s.policies) == [["a", "b"], ["c", "d"]]
    s.loop.tick(now=1.0)
    assert sorted(p.seen for p in s.policies) == [[["a", "b"]] * 2, [["c", "d"]] * 2]


async def test_the_kunserve_policy_drops_under_a_flood_and_restores_after_it():
    """The real policy over reports: a and b vote for the window, drop; the group's load
    falls, it restores after the hold; the restored members do not vote during it."""
    config = GroupConfig(vote_window_s=1.0, restore_window_s=2.0, hold_s=5.0, group_sizes=(2,))
    s = setup("a", "b", "c", make_policy=lambda: make_group_policy("kunserve", config=config))
    registry = s.table.registry
    seq = iter(range(2, 10_000))

    def report(*loads) -> None:
        for ld in loads:
            assert registry.report(LoadReport(ld, seq=next(seq)))

    full = {i: load(i, 96, 8, waiting=3, waiting_blocks=40) for i in ("a", "b")}
    report(*full.values(), load("c", 10, 1))
    assert s.loop.tick(now=0.0) == GroupRound()
    assert s.loop.tick(now=0.5) == GroupRound()
    assert s.loop.tick(now=1.0) == GroupRound(drops=[("a", "b")])
    s.clock.now = 1.2
    await s.loop.join()
    assert s.workers.formed == [("a", "b")]
    # The group serves: stage 0 reports its load, stage 1 its group and nothing else.
    report(
        load("a", 100, 16, total=330, group_id="group-0"),
        load("b", 0, 0, total=0, group_id="group-0", group_stage=1),
    )
    assert s.loop.tick(now=2.0) == GroupRound()
    report(load("a", 100, 5, total=330, group_id="group-0"))
    for now in (3.0, 4.0, 5.0):  # low and falling, but the group is younger than hold_s
        assert s.loop.tick(now=now) == GroupRound()
    report(load("a", 90, 3, total=330, group_id="group-0"))
    assert s.loop.tick(now=6.0) == GroupRound()  # formed at 1.2: not hold_s (5) yet
    report(load("a", 80, 2, total=330, group_id="group-0"))
    assert s.loop.tick(now=6.5) == GroupRound(restores=["group-0"])
    s.clock.now = 7.0
    await s.loop.join()
    assert s.workers.dissolved == ["group-0"]
    # Alone again and overloaded at once: no vote until hold_s after the restore.
    report(*full.values())
    for now in (7.5, 9.0, 11.0, 11.9):
        assert s.loop.tick(now=now) == GroupRound()
    assert s.loop.tick(now=12.0) == GroupRound()  # the vote starts here...
    assert s.loop.tick(now=13.0) == GroupRound(drops=[("a", "b")])  # ...and holds
    await s.loop.join()


def test_the_server_runs_a_group_loop_only_when_a_group_policy_is_chosen():
    def loop_of(config: SchedulerConfig):
        registry = InstanceRegistry(lease_s=config.lease_s)
        servicer = SchedulerServicer(config, registry)
        return make_group_loop(config, registry, servicer), servicer

    assert loop_of(SchedulerConfig(policy="llumnix"))[0] is None
    assert loop_of(SchedulerConfig(group_policy="none"))[0] is None
    loop, servicer = loop_of(SchedulerConfig(group_interval_s=0.5))  # llmesh, the default
    assert (loop.interval_s, loop.control) == (0.5, servicer.group_control)
    policy = loop.make_policy()
    assert (policy.name, policy.config.interval_s) == ("llmesh", 0.5)
