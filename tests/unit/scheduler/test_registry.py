"""services.scheduler.registry: leases, report ordering, pending dispatches."""

from __future__ import annotations

import pytest

from services.common.messages import InstanceSpec, LoadReport
from services.policies import InstanceLoad
from services.scheduler.registry import InstanceRegistry
from tests.clock import FakeClock


def spec(instance_id: str, block_size: int = 16) -> InstanceSpec:
    return InstanceSpec(
        instance_id, f"addr-{instance_id}", "tiny", block_size, 4, 0, 4, 2048, 258, 257
    )


def load(
    instance_id: str, seq: int, used: int = 0, running: int = 0, block_size: int = 16
) -> LoadReport:
    load = InstanceLoad(
        instance_id, 100, used, running, 0, virtual_usage=used, freeness=100 - used,
        block_size=block_size,
    )  # fmt: skip
    return LoadReport(load, seq)


def test_lease_runs_out_without_reports_and_reports_renew_it():
    clock = FakeClock()
    registry = InstanceRegistry(lease_s=3.0, clock=clock)
    registry.register(spec("a"))
    registry.register(spec("b"))
    clock.now = 2.0
    assert registry.report(load("a", 1)) is True
    clock.now = 3.5
    assert registry.expire() == ["b"]
    assert [r.spec.instance_id for r in registry.records()] == ["a"]
    clock.now = 5.1
    assert registry.expire() == ["a"]
    assert len(registry) == 0


def test_unknown_instance_reports_are_refused():
    registry = InstanceRegistry(lease_s=1.0)
    assert registry.report(load("ghost", 1)) is False


def test_older_reports_never_overwrite_newer_ones_until_re_registration():
    registry = InstanceRegistry(lease_s=1.0)
    registry.register(spec("a"))
    registry.report(load("a", 5, used=50))
    registry.report(load("a", 4, used=10))
    assert registry.get("a").report.load.num_used_blocks == 50
    registry.register(spec("a"))  # a restarted process counts from 1 again
    registry.report(load("a", 1, used=7))
    assert registry.get("a").report.load.num_used_blocks == 7


def test_a_registered_instance_looks_idle_until_it_reports():
    registry = InstanceRegistry(lease_s=1.0)
    registry.register(spec("a", block_size=32))
    [fresh] = registry.loads()
    assert (fresh.num_total_blocks, fresh.freeness, fresh.block_size) == (0, 0.0, 32)
    registry.report(load("a", 3, used=40, running=2))
    registry.register(spec("a", block_size=32))  # re-registration keeps the pool size
    [again] = registry.loads()
    assert (again.num_total_blocks, again.num_used_blocks, again.freeness) == (100, 0, 100.0)
    assert registry.get("a").report.seq == 0


def test_pending_dispatches_count_until_a_later_report():
    clock = FakeClock()
    registry = InstanceRegistry(lease_s=2.0, clock=clock)
    registry.register(spec("a", block_size=32))
    registry.report(load("a", 1, used=10, running=1, block_size=32))
    registry.note_dispatch("a", "r1", num_blocks=5)
    registry.note_dispatch("a", "r2", num_blocks=3)
    [effective] = registry.loads()
    assert (effective.virtual_usage, effective.num_waiting, effective.num_waiting_blocks) == (
        18.0,
        2,
        8,
    )
    assert effective.block_size == 32
    clock.now = 1.0  # older than the pending TTL (0.5 s): the next report shows them
    registry.report(load("a", 2, used=18, running=3))
    [effective] = registry.loads()
    assert (effective.virtual_usage, effective.num_waiting, effective.num_waiting_blocks) == (
        18.0,
        0,
        0,
    )


def test_a_pending_dispatch_ends_when_a_report_names_its_arrival():
    clock = FakeClock()
    registry = InstanceRegistry(lease_s=2.0, clock=clock)
    registry.register(spec("a"))
    registry.report(load("a", 1, used=10, running=1))
    registry.note_dispatch("a", "r1", num_blocks=5)
    registry.note_dispatch("a", "r2", num_blocks=3)
    clock.now = 0.1
    # The worker names r1 (and counts it itself, here in its used blocks): r2 stays pending.
    named = LoadReport(load("a", 2, used=15, running=2).load, 2, arrived_request_ids=("r1",))
    registry.report(named)
    [effective] = registry.loads()
    assert [p.request_id for p in registry.get("a").pending] == ["r2"]
    assert (effective.virtual_usage, effective.num_waiting, effective.num_waiting_blocks) == (
        18.0,
        1,
        3,
    )
    # A report overtaken by a newer one still ends the dispatches it names.
    registry.report(load("a", 4, used=18, running=3))
    stale = LoadReport(load("a", 3).load, 3, arrived_request_ids=("r2",))
    registry.report(stale)
    assert registry.get("a").pending == []
    assert registry.get("a").report.seq == 4


def test_a_dispatch_no_report_names_stops_counting_after_the_ttl():
    clock = FakeClock()
    registry = InstanceRegistry(lease_s=2.0, clock=clock)
    registry.register(spec("a"))
    registry.note_dispatch("a", "lost", num_blocks=4)
    clock.now = 0.4
    registry.report(load("a", 1))
    assert [p.request_id for p in registry.get("a").pending] == ["lost"]
    clock.now = 0.6
    registry.report(load("a", 2))
    assert registry.get("a").pending == []


def test_lease_must_be_positive():
    with pytest.raises(ValueError, match="lease_s=0"):
        InstanceRegistry(lease_s=0)
