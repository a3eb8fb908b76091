"""services.scheduler.groups: DropGroup validation, plans, restore, and what reports say."""

from __future__ import annotations

import dataclasses

import grpc
import pytest

from services.common.errors import FailedPreconditionError, NotFoundError, UnavailableError
from services.common.groups import GroupMember, GroupSpec, GroupStatus
from services.common.messages import InstanceSpec, LoadReport
from services.policies import make_instance_load
from services.scheduler.groups import GroupTable
from services.scheduler.registry import InstanceRegistry
from tests.clock import FakeClock


def spec(instance_id: str, num_layers: int = 4, **changes) -> InstanceSpec:
    base = InstanceSpec(
        instance_id,
        f"addr-{instance_id}",
        "tiny",
        16,
        num_layers,
        0,
        num_layers,
        2048,
        258,
        257,
        transport_address=f"ucx-{instance_id}".encode(),
        kernels="torch",
    )
    return dataclasses.replace(base, **changes)


def report(
    instance_id: str,
    seq: int,
    *,
    group_id: str = "",
    stage: int = 0,
    layers: tuple[int, int] = (0, 0),
    total: int = 100,
    freed: int = 0,
    terminating: bool = False,
) -> LoadReport:
    load = make_instance_load(
        instance_id,
        num_total_blocks=total,
        num_used_blocks=0,
        num_running=0,
        is_terminating=terminating,
        group_id=group_id,
        group_stage=stage,
    )
    return LoadReport(
        load, seq, layer_start=layers[0], layer_end=layers[1], freed_weight_bytes=freed
    )


def table_with(*specs: InstanceSpec, clock: FakeClock | None = None) -> GroupTable:
    registry = InstanceRegistry(lease_s=3.0, clock=clock or FakeClock())
    for s in specs:
        registry.register(s)
        assert registry.report(report(s.instance_id, 1))
    return GroupTable(registry)


def member(instance_id: str, stage: int, start: int, end: int) -> GroupMember:
    return GroupMember(instance_id, f"addr-{instance_id}", f"ucx-{instance_id}".encode(), stage, start, end)  # fmt: skip


# ---- plans ---------------------------------------------------------------------------


def test_a_plan_of_two_keeps_the_given_stage_order_and_halves_the_layers():
    table = table_with(spec("a"), spec("b"))
    group = table.plan(["b", "a"])
    assert group == GroupSpec(
        "group-0",
        (member("b", 0, 0, 2), member("a", 1, 2, 4)),
        GroupStatus.DROPPING,
        block_size=16,
    )
    assert table.groups() == [group]
    assert table.member_ids() == {"a", "b"}


def test_a_plan_of_four_splits_ten_layers_with_the_extra_ones_first():
    table = table_with(*(spec(i, num_layers=10) for i in "abcdef"))
    assert table.plan(["e", "f"]).group_id == "group-0"
    group = table.plan(["a", "b", "c", "d"])
    assert group.group_id == "group-1"
    assert group.members == (
        member("a", 0, 0, 3),
        member("b", 1, 3, 6),
        member("c", 2, 6, 8),
        member("d", 3, 8, 10),
    )
    assert [g.group_id for g in table.groups()] == ["group-0", "group-1"]


def test_a_plan_may_have_as_many_stages_as_layers():
    table = table_with(*(spec(i, num_layers=2) for i in "ab"))
    assert table.plan(["a", "b"]).members == (member("a", 0, 0, 1), member("b", 1, 1, 2))


# ---- validation ------------------------------------------------------------------------

MIXED = (
    spec("a"),
    spec("b"),
    spec("model", model_id="other"),
    spec("block", block_size=32),
    spec("kern", kernels="native"),
    spec("deep", num_layers=8, layer_end=8),
    spec("half", layer_end=2),
    spec("nodata", transport_address=b""),
    spec("c"),
    spec("d"),
    spec("e"),
)


@pytest.mark.parametrize(
    ("instance_ids", "error", "message"),
    [
        ([], ValueError, "instance_ids: a group needs 2 or more instances, got 0"),
        (["a"], ValueError, "instance_ids: a group needs 2 or more instances, got 1"),
        (["a", ""], ValueError, "instance_ids[1] must not be empty"),
        (["a", "b", "a"], ValueError, "instance_ids: 'a' is listed twice"),
        (["a", "ghost"], NotFoundError, "instance 'ghost' is not registered"),
        (
            ["a", "model"],
            ValueError,
            "instance_ids: 'model' has model_id='other' but 'a' has 'tiny'; "
            "the members of a group must match",
        ),
        (
            ["a", "block"],
            ValueError,
            "instance_ids: 'block' has block_size=32 but 'a' has 16; "
            "the members of a group must match",
        ),
        (
            ["a", "kern"],
            ValueError,
            "instance_ids: 'kern' has kernels='native' but 'a' has 'torch'; "
            "the members of a group must match",
        ),
        (
            ["a", "deep"],
            ValueError,
            "instance_ids: 'deep' has num_layers=8 but 'a' has 4; "
            "the members of a group must match",
        ),
        (
            ["a", "b", "c", "d", "e"],
            ValueError,
            "instance_ids: 5 stages exceed num_layers=4 (every stage keeps a layer)",
        ),
        (
            ["a", "half"],
            FailedPreconditionError,
            "instance 'half' holds layers [0, 2) of 4, not all",
        ),
        (
            ["nodata", "a"],
            FailedPreconditionError,
            "instance 'nodata' has no data-plane address (transport_address)",
        ),
    ],
)
def test_bad_drop_requests_are_refused_naming_the_field_or_instance(instance_ids, error, message):
    table = table_with(*MIXED)
    with pytest.raises(error) as info:
        table.plan(instance_ids)
    assert str(info.value) == message
    assert table.groups() == []
    # A refused request uses no id.
    assert table.plan(["a", "b"]).group_id == "group-0"


def test_the_error_classes_carry_the_grpc_codes():
    assert NotFoundError.code == grpc.StatusCode.NOT_FOUND
    assert FailedPreconditionError.code == grpc.StatusCode.FAILED_PRECONDITION
    assert UnavailableError.code == grpc.StatusCode.UNAVAILABLE


def test_members_of_a_group_in_the_table_or_in_their_reports_cannot_join_another():
    table = table_with(spec("a"), spec("b"), spec("c"), spec("d"))
    table.plan(["a", "b"])
    with pytest.raises(FailedPreconditionError) as info:
        table.plan(["c", "b"])
    assert str(info.value) == "instance 'b' is already in group 'group-0'"
    # d reports a group this scheduler does not know (yet).
    assert table.registry.report(report("d", 2, group_id="group-9", stage=1, layers=(2, 4)))
    with pytest.raises(FailedPreconditionError) as info:
        table.plan(["c", "d"])
    assert str(info.value) == "instance 'd' is already in group 'group-9'"


def test_draining_instances_cannot_join():
    table = table_with(spec("a"), spec("b"), spec("c"))
    assert table.registry.report(report("b", 2, terminating=True))
    with pytest.raises(FailedPreconditionError) as info:
        table.plan(["a", "b"])
    assert str(info.value) == "instance 'b' is draining"
    # The scaling loop drains c, whose reports do not show it yet.
    with pytest.raises(FailedPreconditionError) as info:
        table.plan(["a", "c"], draining={"c"})
    assert str(info.value) == "instance 'c' is draining"


# ---- the group's life ------------------------------------------------------------------


def test_drop_then_restore_walks_the_statuses():
    table = table_with(spec("a"), spec("b"))
    planned = table.plan(["a", "b"])
    with pytest.raises(FailedPreconditionError) as info:
        table.begin_restore("group-0")
    assert str(info.value) == "group 'group-0' is dropping; only a serving group can be restored"
    serving = table.mark_serving("group-0", 320, 200, 4096)
    assert serving == dataclasses.replace(
        planned,
        status=GroupStatus.SERVING,
        num_group_blocks=320,
        num_blocks_before=200,
        freed_weight_bytes=4096,
    )
    assert table.begin_restore("group-0").status is GroupStatus.RESTORING
    with pytest.raises(FailedPreconditionError, match="is restoring"):
        table.begin_restore("group-0")
    table.end_restore("group-0", is_dissolved=False)  # DissolveGroup failed: serves on
    assert table.get("group-0").status is GroupStatus.SERVING
    table.begin_restore("group-0")
    table.end_restore("group-0", is_dissolved=True)
    assert (table.groups(), table.member_ids()) == ([], set())
    # Reports sent before the restore still name the group: it does not come back.
    assert table.registry.report(report("a", 2, group_id="group-0", stage=0, layers=(0, 2)))
    assert table.registry.report(report("b", 2, group_id="group-0", stage=1, layers=(2, 4)))
    table.observe("b")
    assert table.groups() == []
    # Nor is its id given out again once the members report serving alone.
    for i in "ab":
        assert table.registry.report(report(i, 3))
    assert table.plan(["b", "a"]).group_id == "group-1"


def test_restore_of_an_unknown_or_unnamed_group_is_refused():
    table = table_with(spec("a"), spec("b"))
    table.plan(["a", "b"])
    with pytest.raises(NotFoundError) as info:
        table.begin_restore("group-7")
    assert str(info.value) == "group 'group-7' does not exist; known: ['group-0']"
    with pytest.raises(ValueError, match="^group_id must not be empty$"):
        table.begin_restore("")


def test_a_member_leaving_the_registry_forgets_its_group_only():
    clock = FakeClock()
    table = table_with(*(spec(i) for i in "abcd"), clock=clock)
    table.mark_serving(table.plan(["a", "b"]).group_id, 300, 200, 1)
    table.mark_serving(table.plan(["c", "d"]).group_id, 300, 200, 1)
    clock.now = 2.0
    for i in "acd":
        assert table.registry.report(report(i, 2))
    clock.now = 3.5  # b's lease (3 s) ran out
    expired = table.registry.expire()
    assert expired == ["b"]
    assert table.forget_members(expired) == ["group-0"]
    assert [g.group_id for g in table.groups()] == ["group-1"]
    assert table.forget_members(["x"]) == []


def test_a_group_forgotten_while_dropping_cannot_be_marked_serving():
    table = table_with(spec("a"), spec("b"))
    table.plan(["a", "b"])
    table.forget_members(["b"])
    with pytest.raises(UnavailableError) as info:
        table.mark_serving("group-0", 300, 200, 1)
    assert str(info.value) == (
        "group 'group-0' was dissolved while dropping: a member left the registry"
    )


def test_annotate_marks_members_whose_reports_do_not_show_the_group_yet():
    table = table_with(spec("a"), spec("b"), spec("c"))
    table.plan(["b", "a"])
    loads = {ld.instance_id: ld for ld in table.annotate(table.registry.loads())}
    assert {i: (ld.group_id, ld.group_stage) for i, ld in loads.items()} == {
        "a": ("group-0", 1),
        "b": ("group-0", 0),
        "c": ("", 0),
    }
    assert (loads["a"].is_group_follower, loads["b"].is_group_follower) == (True, False)


# ---- what reports say ------------------------------------------------------------------


def test_a_restarted_scheduler_re_learns_a_group_once_every_stage_reported():
    table = table_with(*(spec(i, num_layers=10) for i in "abcde"))
    layers = {"c": (0, 3), "a": (3, 6), "d": (6, 8), "b": (8, 10)}
    for seq, (i, stage) in enumerate((("a", 1), ("d", 2), ("b", 3)), start=2):
        assert table.registry.report(
            report(i, seq, group_id="group-3", stage=stage, layers=layers[i], freed=100)
        )
        table.observe(i)
        assert table.groups() == []  # stage 0 has not reported yet
    assert table.registry.report(
        report("c", 5, group_id="group-3", stage=0, layers=(0, 3), total=450, freed=10)
    )
    table.observe("c")
    assert table.groups() == [
        GroupSpec(
            "group-3",
            (member("c", 0, 0, 3), member("a", 1, 3, 6), member("d", 2, 6, 8), member("b", 3, 8, 10)),
            GroupStatus.SERVING,
            num_group_blocks=450,
            num_blocks_before=0,
            freed_weight_bytes=310,
            block_size=16,
        )
    ]  # fmt: skip


def test_reports_with_gaps_or_two_claims_on_a_stage_teach_nothing():
    table = table_with(*(spec(i) for i in "abc"))
    assert table.registry.report(report("a", 2, group_id="g", stage=0, layers=(0, 1)))
    assert table.registry.report(report("b", 2, group_id="g", stage=1, layers=(2, 4)))
    table.observe("b")
    assert table.groups() == []  # layer 1 is nobody's
    assert table.registry.report(report("b", 3, group_id="g", stage=1, layers=(1, 4)))
    assert table.registry.report(report("c", 2, group_id="g", stage=1, layers=(1, 4)))
    table.observe("c")
    assert table.groups() == []  # b and c both claim stage 1
    assert table.registry.report(report("c", 3))  # c leaves the claim
    table.observe("c")
    assert table.groups() == []  # c reports no group: nothing to learn from it
    assert table.registry.report(report("a", 3, group_id="g", stage=0, layers=(0, 1)))
    table.observe("a")
    assert [(g.group_id, g.status) for g in table.groups()] == [("g", GroupStatus.SERVING)]


def test_new_ids_skip_groups_the_reports_name():
    table = table_with(*(spec(i) for i in "abc"))
    assert table.registry.report(report("c", 2, group_id="group-0", stage=1, layers=(2, 4)))
    assert table.plan(["a", "b"]).group_id == "group-1"


def test_a_serving_group_no_member_reports_any_more_is_forgotten():
    table = table_with(spec("a"), spec("b"))
    table.mark_serving(table.plan(["a", "b"]).group_id, 300, 200, 1)
    # Reports sent before the group formed (seq not above the ones at that time) and
    # a member still reporting it keep the group.
    table.observe("a")
    assert len(table) == 1
    assert table.registry.report(report("a", 2))
    assert table.registry.report(report("b", 2, group_id="group-0", stage=1, layers=(2, 4)))
    table.observe("a")
    assert len(table) == 1
    # Both members report serving alone: the group dissolved without us.
    assert table.registry.report(report("b", 3))
    table.observe("b")
    assert table.groups() == []


def test_a_member_that_registers_again_counts_its_reports_from_the_start():
    table = table_with(spec("a"), spec("b"))
    table.mark_serving(table.plan(["a", "b"]).group_id, 300, 200, 1)  # seen at seq 1
    # a's process restarted: it registers again and reports from seq 1, alone.
    table.registry.register(spec("a"))
    table.note_registered("a")
    assert table.registry.report(report("a", 1))
    assert table.registry.report(report("b", 2))
    table.observe("b")
    assert table.groups() == []
