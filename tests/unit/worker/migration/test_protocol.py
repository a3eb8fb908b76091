"""Live migration protocol: exact tokens after moves, and every abort path clean."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import threading
import time

import pytest

from services.worker.engine import LLMEngine, SamplingParams
from services.worker.migration import MigrationConfig, MigrationMode, MigrationStatus
from services.worker.migration.faults import FaultHooks
from tests.clock import FakeClock
from tests.unit.worker.migration.conftest import ENGINE_CONFIG
from tests.unit.worker.migration.harness import reference_tokens

pytestmark = pytest.mark.timeout(120)


def prompt(seed: int, length: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(256) for _ in range(length)]


async def wait_tokens(streams, request_id: str, num_tokens: int) -> None:
    while (
        len(streams[request_id].tokens) < num_tokens and not streams[request_id].finished.is_set()
    ):
        await asyncio.sleep(0.002)


GREEDY = SamplingParams(max_tokens=120, ignore_eos=True)
SEEDED = SamplingParams(
    max_tokens=120, temperature=0.9, top_p=0.9, top_k=50, seed=1234, ignore_eos=True
)


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
async def test_migrated_request_yields_the_unmoved_tokens(cluster, params):
    a, b, streams = await cluster()
    p = prompt(1, 150)
    expected = reference_tokens(ENGINE_CONFIG, p, params)
    await a.add("r1", p, params)
    await a.add("other", prompt(2, 40), SamplingParams(max_tokens=60, ignore_eos=True))
    await wait_tokens(streams, "r1", 10)

    result = await a.source.migrate("r1", b.target())

    assert result.status == MigrationStatus.COMMITTED, result
    assert result.num_stages >= 2  # at least one live stage and the stop-and-copy
    assert (
        result.num_blocks == -(-(150 + len(streams["r1"].tokens) - 1) // 4)
        or result.num_blocks > 37
    )
    await asyncio.wait_for(streams["r1"].finished.wait(), 60)
    await asyncio.wait_for(streams["other"].finished.wait(), 60)
    assert streams["r1"].tokens == expected
    assert "b" in streams["r1"].sources and streams["r1"].sources[0] == "a"
    assert set(streams["other"].sources) == {"a"}


async def test_stages_travel_in_chunks_of_stage_chunk_bytes(cluster):
    # One block per transfer: a stage of n blocks is n transfers, read ahead of the wire.
    block_nbytes = LLMEngine.from_config(ENGINE_CONFIG).kv_block_nbytes
    a, b, streams = await cluster(MigrationConfig(stage_chunk_bytes=block_nbytes))
    p = prompt(3, 130)
    expected = reference_tokens(ENGINE_CONFIG, p, GREEDY)
    await a.add("r1", p, GREEDY)
    await wait_tokens(streams, "r1", 5)

    result = await a.source.migrate("r1", b.target())

    assert result.status == MigrationStatus.COMMITTED, result
    assert result.num_blocks >= 130 // 4
    # Every transfer carries one block; an empty last stage is one offer without bytes.
    assert result.num_stages in (result.num_blocks, result.num_blocks + 1)
    assert result.num_bytes == result.num_blocks * a.engine.kv_block_nbytes
    assert a.source._stages.buffers.num_free >= 1 and b.destination._buffers.num_free >= 1  # reused
    await asyncio.wait_for(streams["r1"].finished.wait(), 60)
    assert streams["r1"].tokens == expected
    assert streams["r1"].sources[0] == "a" and streams["r1"].sources[-1] == "b"


async def test_back_and_forth_repeatedly(cluster):
    a, b, streams = await cluster()
    params = SamplingParams(max_tokens=200, temperature=0.7, seed=7, ignore_eos=True)
    p = prompt(3, 90)
    expected = reference_tokens(ENGINE_CONFIG, p, params)
    await a.add("r", p, params)
    here, there = a, b
    outcomes = []
    for hop in range(4):
        await wait_tokens(streams, "r", 20 + 25 * hop)
        result = await here.source.migrate("r", there.target())
        outcomes.append(result.status)
        here, there = there, here
    await asyncio.wait_for(streams["r"].finished.wait(), 60)
    assert outcomes == [MigrationStatus.COMMITTED] * 4
    assert streams["r"].tokens == expected
    # the stream changed hands at each move, in order a, b, a, b, a
    hands = [
        s for i, s in enumerate(streams["r"].sources) if i == 0 or streams["r"].sources[i - 1] != s
    ]
    assert hands == ["a", "b", "a", "b", "a"]


async def test_destination_without_room_refuses_and_request_continues(cluster):
    a, b, streams = await cluster(MigrationConfig(max_incoming=1))
    params = SamplingParams(max_tokens=80, ignore_eos=True)
    p = prompt(4, 60)
    expected = reference_tokens(ENGINE_CONFIG, p, params)
    # Fill b's only migration slot with a reservation that will never commit.
    from services.worker.migration import PrepareOffer

    blocker = await b.destination.prepare(
        PrepareOffer("blocker", "x", "a", a.transport.address, 4, 60.0, 16, "torch")
    )
    assert blocker.accepted
    await a.add("r", p, params)
    await wait_tokens(streams, "r", 5)
    result = await a.source.migrate("r", b.target())
    assert (result.status, result.reason) == (
        MigrationStatus.ABORTED,
        "destination_refused: no_migration_slot",
    )
    assert await b.destination.abort("blocker", "test") is True
    await asyncio.wait_for(streams["r"].finished.wait(), 60)
    assert streams["r"].tokens == expected
    assert set(streams["r"].sources) == {"a"}


async def _refused_and_continues(a, b, streams, reason: str) -> None:
    """A move from a to b is refused with `reason`; the request finishes on a, exactly."""
    params = SamplingParams(max_tokens=80, ignore_eos=True)
    p = prompt(4, 60)
    expected = reference_tokens(ENGINE_CONFIG, p, params)
    await a.add("r", p, params)
    await wait_tokens(streams, "r", 5)
    result = await a.source.migrate("r", b.target())
    assert (result.status, result.reason, result.num_stages, result.num_bytes) == (
        MigrationStatus.ABORTED,
        f"destination_refused: {reason}",
        0,
        0,
    )
    assert b.destination.num_active == 0
    await asyncio.wait_for(streams["r"].finished.wait(), 60)
    assert streams["r"].tokens == expected
    assert set(streams["r"].sources) == {"a"}


async def test_destination_on_other_kernels_refuses_and_request_continues(cluster):
    native = dataclasses.replace(ENGINE_CONFIG, kernels="native")
    try:
        LLMEngine.from_config(native)
    except ValueError as exc:
        pytest.skip(f"needs the native kernels: {exc}")
    a, b, streams = await cluster(b_engine_config=native)
    await _refused_and_continues(
        a, b, streams,
        "incompatible_kernels: the source runs 'torch' kernels, this instance 'native'",
    )  # fmt: skip


async def test_destination_on_another_device_refuses_and_request_continues(cluster):
    a, b, streams = await cluster()
    # b stands for a GPU worker (no GPU here: its engine's device kind is all that differs).
    b.engine.device_kind = "cuda:NVIDIA H100 80GB HBM3"
    await _refused_and_continues(
        a, b, streams,
        "incompatible_device: the source runs on 'cpu', "
        "this instance on 'cuda:NVIDIA H100 80GB HBM3'",
    )  # fmt: skip


class RecordingFaults(FaultHooks):
    """Records where the source called its hooks (and changes nothing)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    async def before_stage(self, stage_index: int) -> None:
        self.calls.append(("before_stage", stage_index))

    async def before_commit(self) -> None:
        self.calls.append(("before_commit", -1))

    def transfer_id(self, stage_index: int, transfer_id: str) -> str:
        self.calls.append(("transfer_id", stage_index))
        return transfer_id


async def test_the_source_calls_its_fault_hooks_at_each_stage_and_before_commit(cluster):
    faults = RecordingFaults()
    a, b, streams = await cluster(MigrationConfig(max_stages=2), a_faults=faults)
    p = prompt(5, 120)
    expected = reference_tokens(ENGINE_CONFIG, p, GREEDY)
    await a.add("r", p, GREEDY)
    await wait_tokens(streams, "r", 2)
    result = await a.source.migrate("r", b.target())
    assert (result.status, result.num_stages) == (MigrationStatus.COMMITTED, 2)
    # One live stage (max_stages=2), the stop-and-copy, then the commit.
    assert faults.calls == [
        ("before_stage", 0),
        ("transfer_id", 0),
        ("before_stage", 1),
        ("transfer_id", 1),
        ("before_commit", -1),
    ]
    await asyncio.wait_for(streams["r"].finished.wait(), 60)
    assert streams["r"].tokens == expected


async def test_request_finishing_mid_migration_aborts_cleanly(cluster):
    a, b, streams = await cluster()
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    p = prompt(5, 120)
    expected = reference_tokens(ENGINE_CONFIG, p, params)
    await a.add("r", p, params)
    await wait_tokens(streams, "r", 2)

    async def let_it_finish(offer):
        # Before the first live stage (the request is still decoding): let it finish.
        if not offer.is_last:
            await asyncio.wait_for(streams["r"].finished.wait(), 30)
        return offer

    a.clients.clear()
    result_task = asyncio.create_task(a.source.migrate("r", b.target()))
    await asyncio.sleep(0)
    a.clients["b"].before_stage = let_it_finish
    result = await result_task
    assert result.status == MigrationStatus.ABORTED
    assert result.reason.startswith("request_finished")
    assert streams["r"].tokens == expected
    assert set(streams["r"].sources) == {"a"}


async def test_data_plane_timeout_aborts_and_request_continues(cluster):
    a, b, streams = await cluster(MigrationConfig(transfer_timeout_s=1.0))
    params = SamplingParams(max_tokens=150, ignore_eos=True)
    p = prompt(6, 100)
    expected = reference_tokens(ENGINE_CONFIG, p, params)
    await a.add("r", p, params)
    await wait_tokens(streams, "r", 3)

    async def misdirect(offer):
        # The destination waits under another transfer id: the data never reaches it.
        return type(offer)(**{**offer.__dict__, "transfer_id": offer.transfer_id + "-lost"})

    a.clients.clear()
    task = asyncio.create_task(a.source.migrate("r", b.target()))
    await asyncio.sleep(0)
    a.clients["b"].before_stage = misdirect
    result = await task
    assert result.status == MigrationStatus.ABORTED
    assert result.reason.startswith(("transfer_failed", "commit_refused"))
    await asyncio.wait_for(streams["r"].finished.wait(), 60)
    assert streams["r"].tokens == expected
    assert set(streams["r"].sources) == {"a"}
    # b's receive timed out or was cancelled; it settles its bookkeeping shortly after.
    for _ in range(200):
        if b.destination.num_active == 0 and a.transport.stats().num_active_sends == 0:
            break
        await asyncio.sleep(0.05)
    assert (b.destination.num_active, a.transport.stats().num_active_sends) == (0, 0)
    assert await b.async_engine.run(lambda e: e.block_manager.num_used_blocks) == 0


@pytest.mark.parametrize(
    ("own_lease_s", "offered_lease_s", "lease_s"),
    [(0.2, 0.2, 0.2), (3.0, 0.2, 0.2), (0.2, 1.0, 1.0), (0.2, 0.0, 0.2)],
)
async def test_silent_source_lease_frees_the_reservation(
    cluster, own_lease_s, offered_lease_s, lease_s
):
    """The lease is the one the source offered; an offer without one gets the
    destination's own."""
    clock = FakeClock()
    a, b, streams = await cluster(MigrationConfig(lease_s=own_lease_s), b_clock=clock)
    from services.worker.migration import PrepareOffer

    reply = await b.destination.prepare(
        PrepareOffer("m1", "ghost", "a", a.transport.address, 10, offered_lease_s, 40, "torch")
    )
    assert reply.accepted
    await asyncio.sleep(0.3)  # lease checks run, but the lease clock has not moved
    clock.now = lease_s * 0.9  # silent, but not for a whole lease yet
    await asyncio.sleep(0.3)
    assert b.destination.num_active == 1
    assert await b.async_engine.run(lambda e: e.block_manager.num_used_blocks) == 10
    clock.now = lease_s * 1.1  # the source has been silent for longer than the lease
    for _ in range(100):
        if b.destination.num_active == 0:
            break
        await asyncio.sleep(0.02)
    assert b.destination.num_active == 0
    assert await b.async_engine.run(lambda e: e.block_manager.num_used_blocks) == 0


async def test_commit_is_idempotent(cluster):
    a, b, streams = await cluster()
    params = SamplingParams(max_tokens=60, ignore_eos=True)
    p = prompt(8, 50)
    expected = reference_tokens(ENGINE_CONFIG, p, params)
    await a.add("r", p, params)
    await wait_tokens(streams, "r", 4)
    a.clients.clear()
    task = asyncio.create_task(a.source.migrate("r", b.target()))
    await asyncio.sleep(0)
    client = a.clients["b"]
    original_commit = client.destination.commit
    replies = []

    async def commit_twice(offer):
        first = await original_commit(offer)
        second = await original_commit(offer)  # a retry after a "lost" reply
        replies.extend([first, second])
        return second

    client.destination.commit = commit_twice
    result = await task
    client.destination.commit = original_commit
    assert result.status == MigrationStatus.COMMITTED
    assert replies == [(True, ""), (True, "already_committed")]
    await asyncio.wait_for(streams["r"].finished.wait(), 60)
    assert streams["r"].tokens == expected


async def test_migrations_both_ways_at_once_with_new_arrivals(cluster):
    a, b, streams = await cluster()
    params = {
        f"r{i}": SamplingParams(max_tokens=400, temperature=0.8, seed=i, ignore_eos=True)
        for i in range(6)
    }
    prompts = {rid: prompt(20 + i, 30 + 10 * i) for i, rid in enumerate(params)}
    expected = {rid: reference_tokens(ENGINE_CONFIG, prompts[rid], params[rid]) for rid in params}
    for i, rid in enumerate(params):
        await (a if i % 2 == 0 else b).add(rid, prompts[rid], params[rid])
    for rid in ("r0", "r1", "r2", "r3"):
        await wait_tokens(streams, rid, 10)
    moves = [a.source.migrate(rid, b.target()) for rid in ("r0", "r2")]
    moves += [b.source.migrate(rid, a.target()) for rid in ("r1", "r3")]
    late = {
        f"late{i}": SamplingParams(max_tokens=30, seed=100 + i, ignore_eos=True) for i in range(3)
    }
    for i, rid in enumerate(late):
        expected[rid] = reference_tokens(ENGINE_CONFIG, prompt(50 + i, 20), late[rid])
        await (a if i % 2 else b).add(rid, prompt(50 + i, 20), late[rid])
    results = await asyncio.gather(*moves)
    assert [r.status for r in results] == [MigrationStatus.COMMITTED] * 4
    for rid in expected:
        await asyncio.wait_for(streams[rid].finished.wait(), 60)
        assert streams[rid].tokens == expected[rid], rid


@pytest.mark.parametrize("mode", [MigrationMode.BLOCKING_COPY, MigrationMode.RECOMPUTE])
async def test_baseline_modes_also_preserve_tokens(cluster, mode):
    a, b, streams = await cluster()
    params = SamplingParams(max_tokens=60, temperature=0.8, seed=3, ignore_eos=True)
    p = prompt(9, 70)
    expected = reference_tokens(ENGINE_CONFIG, p, params)
    await a.add("r", p, params)
    await wait_tokens(streams, "r", 5)
    result = await a.source.migrate("r", b.target(), mode)
    assert result.status == MigrationStatus.COMMITTED
    if mode is MigrationMode.RECOMPUTE:
        assert (result.num_stages, result.num_blocks, result.num_bytes) == (0, 0, 0)
    else:
        assert result.num_stages == 1 and result.num_blocks >= 70 // 4
    await asyncio.wait_for(streams["r"].finished.wait(), 60)
    assert streams["r"].tokens == expected


async def test_a_rehome_waits_out_a_handoff_until_the_migration_settled(cluster):
    """Once the handoff fixed the request's owner, a Rehome on the source must not change
    it before the commit settled: it waits, then finds the request gone (committed)."""
    waiters = []

    class RehomeDuringHandoff(FaultHooks):
        async def after_handoff(self) -> None:
            waiter = asyncio.create_task(a.source.wait_handed_over("r"))
            waiters.append(waiter)
            await asyncio.sleep(0.2)
            assert not waiter.done()  # held until the migration settles

    a, b, streams = await cluster(a_faults=RehomeDuringHandoff())
    p = prompt(5, 120)
    expected = reference_tokens(ENGINE_CONFIG, p, GREEDY)
    await a.add("r", p, GREEDY)
    await wait_tokens(streams, "r", 2)
    assert await a.source.wait_handed_over("r") is None  # not migrating: at once
    result = await a.source.migrate("r", b.target())
    assert result.status == MigrationStatus.COMMITTED
    [waiter] = waiters
    await asyncio.wait_for(waiter, 5)
    assert not a.source.is_migrating("r")
    await asyncio.wait_for(streams["r"].finished.wait(), 60)
    assert streams["r"].tokens == expected


async def test_a_claim_made_on_the_engine_thread_before_the_reservation_refuses_it(cluster):
    """A KunServe PrepareJoin runs on b's engine thread just before a migration's
    reservation, after the destination's first draining check: the reservation sees
    the claim there and is refused, so the join finds no reserved blocks."""
    a, b, streams = await cluster()
    claimed = threading.Event()
    b.destination._is_draining = claimed.is_set

    def prepare_join(engine: LLMEngine) -> None:  # what PrepareJoin's engine call does
        time.sleep(0.3)  # b's step boundary, while the migration's prepare arrives
        claimed.set()

    params = SamplingParams(max_tokens=80, ignore_eos=True)
    p = prompt(4, 60)
    expected = reference_tokens(ENGINE_CONFIG, p, params)
    await a.add("r", p, params)
    await wait_tokens(streams, "r", 5)
    claim = asyncio.create_task(b.async_engine.run(prepare_join))
    await asyncio.sleep(0.05)  # the claim holds b's engine thread now
    result = await a.source.migrate("r", b.target())
    await claim
    assert (result.status, result.reason) == (
        MigrationStatus.ABORTED,
        "destination_refused: draining",
    )
    assert b.destination.num_active == 0
    assert await b.async_engine.run(lambda e: e.block_manager.num_used_blocks) == 0
    await asyncio.wait_for(streams["r"].finished.wait(), 60)
    assert streams["r"].tokens == expected
    assert set(streams["r"].sources) == {"a"}
