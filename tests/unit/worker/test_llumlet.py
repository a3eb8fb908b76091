"""services.worker.llumlet: engine snapshots become load reports with Llumnix's load model."""

from __future__ import annotations

import math

from services.common.messages import InstanceSpec
from services.policies import LoadModelConfig
from services.worker.async_engine import EngineSnapshot
from services.worker.engine import EngineStats, RequestView
from services.worker.llumlet import Intake, Llumlet, load_from_snapshot


def snapshot(
    num_running=2, num_waiting=1, used=30, hol=4, waiting_blocks=4, high=0, taken_at=0.0
) -> EngineSnapshot:
    stats = EngineStats(
        num_running=num_running,
        num_waiting=num_waiting,
        num_total_blocks=100,
        num_free_blocks=100 - used,
        num_used_blocks=used,
        num_hol_blocks=hol,
        num_running_high_priority=high,
        num_preemptions=3,
        num_reserved_blocks=0,
        num_suspended=0,
    )
    running = (
        RequestView("long", 200, 13, 0, 10, False),
        RequestView("short", 40, 3, 1, 2, False),
    )
    return EngineSnapshot(stats, running, waiting_blocks, taken_at=taken_at)


def test_virtual_usage_and_freeness_follow_the_load_model():
    load = load_from_snapshot("w", snapshot(), config=LoadModelConfig(), block_size=16)
    # usage = 30 used + 4 head-of-line; freeness = (100 - 34) / 2 running
    assert (load.virtual_usage, load.freeness) == (34.0, 33.0)
    assert (load.num_waiting_blocks, load.num_preemptions) == (4, 3)
    assert [r.request_id for r in load.running] == ["short", "long"]  # shortest first


def test_headroom_and_draining():
    config = LoadModelConfig(high_priority_headroom_blocks=10)
    load = load_from_snapshot("w", snapshot(high=1), config=config, block_size=16)
    assert (load.virtual_usage, load.num_headroom_blocks) == (44.0, 10)
    draining = load_from_snapshot(
        "w", snapshot(), config=config, block_size=16, is_terminating=True
    )
    assert (
        draining.is_terminating
        and math.isinf(draining.virtual_usage)
        and draining.freeness == -math.inf
    )


async def test_each_report_takes_the_next_sequence_number_and_the_registered_block_size():
    spec = InstanceSpec("w", "127.0.0.1:1", "tiny", 32, 4, 0, 4, 2048, 258, 257)
    llumlet = Llumlet(spec, "127.0.0.1:1", LoadModelConfig(), snapshot(), report_interval_s=1.0)
    try:
        first, second = llumlet.next_report(), llumlet.next_report(snapshot(used=50))
    finally:
        await llumlet.close()
    assert (first.seq, first.load.num_used_blocks, first.load.block_size) == (1, 30, 32)
    assert (second.seq, second.load.num_used_blocks) == (2, 50)
    assert (second.is_integrity_checked, second.integrity_error) == (False, "")


def test_the_intake_counts_a_request_until_a_snapshot_after_its_admission():
    intake = Intake()
    intake.arrived("a", 3)
    intake.arrived("b", 2)
    assert intake.unreported(taken_at=10.0) == (2, 5)  # neither admitted yet
    intake.admitted("a", at=11.0)
    assert intake.unreported(taken_at=10.5) == (2, 5)  # that snapshot came before a joined
    assert intake.unreported(taken_at=11.5) == (1, 2)  # this one shows a: b is left
    assert len(intake) == 2  # asking forgets nothing (a GetLoad's own fresh snapshot)
    intake.forget_before(11.5)  # the llumlet's snapshot shows a now
    assert len(intake) == 1 and intake.unreported(taken_at=10.5) == (1, 2)
    intake.refused("b")
    assert intake.unreported(taken_at=11.5) == (0, 0) and len(intake) == 0
    assert intake.take_arrived() == ["a", "b"] and intake.take_arrived() == []


async def test_a_request_that_arrives_mid_step_is_reported_waiting_and_named_once():
    spec = InstanceSpec("w", "127.0.0.1:1", "tiny", 16, 4, 0, 4, 2048, 258, 257)
    llumlet = Llumlet(
        spec, "127.0.0.1:1", LoadModelConfig(), snapshot(taken_at=1.0), report_interval_s=1.0
    )
    try:
        llumlet.note_arrived("r1", 40)  # 3 blocks of 16
        reports = llumlet._reports()
        first = await anext(reports)
        heartbeat = await anext(reports)  # nothing new: the same load, a new seq
        given = llumlet.next_report(snapshot(taken_at=1.5))  # GetLoad's: as the engine has it
        llumlet.note_admitted("r1", at=2.0)  # the engine took it after that snapshot
        later = llumlet.next_report()
        llumlet.on_snapshot(snapshot(num_waiting=2, waiting_blocks=7, taken_at=3.0))
        shown = llumlet.next_report()
        await reports.aclose()
    finally:
        await llumlet.close()
    assert (first.num_waiting, first.num_waiting_blocks) == (2, 7)  # 1 + r1, 4 + 3
    assert first.virtual_usage == 37.0  # 30 used + 4 head-of-line + r1's 3 blocks
    assert list(first.arrived_request_ids) == ["r1"]
    assert (heartbeat.seq, list(heartbeat.arrived_request_ids)) == (first.seq + 1, [])
    assert (heartbeat.num_waiting, heartbeat.num_waiting_blocks) == (2, 7)
    assert (given.load.num_waiting, given.load.num_waiting_blocks) == (1, 4)
    assert (later.load.num_waiting, later.load.num_waiting_blocks) == (2, 7)
    # The engine's own snapshot counts r1 now: not twice.
    assert (shown.load.num_waiting, shown.load.num_waiting_blocks) == (2, 7)
    assert len(llumlet.intake) == 0
