"""One migration, timed exactly: a flat cost model (every step 10 ms) and a link that
copies one 16-token block of the tiny model (32 KiB) in 10 ms."""

import dataclasses

import pytest

from services.simulator.cluster import Simulator
from services.simulator.config import SimConfig
from services.simulator.profiles import get_profile
from services.simulator.workload import SimRequest
from services.worker.engine.cost_model import CostModelProfile
from services.worker.engine.tiny import TINY_MODEL_CONFIG

FLAT = CostModelProfile(
    name="flat-10ms",
    model=TINY_MODEL_CONFIG,
    dtype="float32",
    fixed_s=0.01,
    per_token_s=0.0,
    per_seq_s=0.0,
    per_context_token_s=0.0,
    per_attention_pair_s=0.0,
)
BLOCK_BYTES = 2048 * 16  # tiny model: 2 KiB of KV per token
CONFIG = SimConfig(
    num_instances=2,
    num_kv_blocks=64,
    max_model_len=512,
    migration="none",  # migrations are started by hand below
    migration_bandwidth_bytes_per_s=BLOCK_BYTES * 100,
    migration_stage_overhead_s=0.0,
)


def simulate(requests, migrate_at, config=CONFIG):
    """Runs with everything on i00 and one migration of r0 to i01 started at `migrate_at`."""
    sim = Simulator(config, requests, get_profile(FLAT))
    sim.dispatch_policy = type("ToFirst", (), {"choose": lambda self, loads, info: "i00"})()

    def start(_):
        assert sim.migrations.start(sim.instances["i00"], sim.instances["i01"], "r0")

    sim.loop.at(migrate_at, start)
    return sim, sim.run()


def test_staged_copy_then_short_stop_and_copy():
    # r0: 160-token prompt (10 blocks), 100 new tokens. Prefill 0-10 ms, first token at 10 ms.
    # At 15 ms the table holds 11 blocks (the running step writes token 161): stage 1 copies
    # 11 blocks (110 ms) while 11 more tokens decode. At 125 ms one block is new (delta 1
    # <= 2): wait for the step boundary at 130 ms, suspend, copy 1 block (10 ms), commit
    # at 140 ms. 13 tokens were made on i00, the other 87 on i01: last token at 1.01 s.
    sim, result = simulate([SimRequest("r0", 0.0, 160, 100)], migrate_at=0.015)
    (record,) = result.records
    assert result.migration.num_committed == 1 and result.migration.num_aborted == 0
    assert result.migration.total_downtime_s == pytest.approx(0.01)
    assert result.migration.num_bytes == 12 * BLOCK_BYTES
    assert record.instance_id == "i01" and record.num_migrations == 1
    assert record.first_token_s == pytest.approx(0.01)
    assert record.finish_s == pytest.approx(1.01)
    assert record.num_generated == 100
    assert sim.instances["i00"].block_manager.num_free_blocks == 64


def test_downtime_is_bounded_whatever_the_sequence_length():
    # Stages shrink the delta until <= last_stage_max_blocks (2) remain: the stop-and-copy
    # moves at most 2 blocks (20 ms) for a 3-block and for a 26-block request alike.
    long, _ = simulate([SimRequest("r0", 0.0, 400, 100)], migrate_at=0.015)
    short, _ = simulate([SimRequest("r0", 0.0, 48, 100)], migrate_at=0.015)
    for sim in (long, short):
        assert sim.migrations.stats.num_committed == 1
        assert sim.migrations.stats.max_downtime_s <= 0.02 + 1e-9
    assert long.migrations.stats.num_bytes > 5 * short.migrations.stats.num_bytes


def test_request_that_finishes_first_aborts_the_migration():
    # 11 blocks take 110 ms to copy; r0 finishes its 5 tokens at 50 ms.
    sim, result = simulate([SimRequest("r0", 0.0, 160, 5)], migrate_at=0.015)
    (record,) = result.records
    assert (result.migration.num_committed, result.migration.num_aborted) == (0, 1)
    assert record.instance_id == "i00" and record.finish_s == pytest.approx(0.05)
    assert sim.instances["i01"].block_manager.num_free_blocks == 64  # reservation released


def test_destination_without_room_refuses():
    config = dataclasses.replace(CONFIG, num_kv_blocks=40)
    requests = [SimRequest("r0", 0.0, 400, 20), SimRequest("r1", 0.0, 400, 20)]
    sim = Simulator(config, requests, get_profile(FLAT))
    sim.dispatch_policy = type(
        "Split",
        (),
        {"choose": lambda self, loads, info: "i00" if info.request_id == "r0" else "i01"},
    )()
    refused = []
    sim.loop.at(
        0.015,
        lambda _: refused.append(
            sim.migrations.start(sim.instances["i00"], sim.instances["i01"], "r0")
        ),
    )
    result = sim.run()
    assert refused == [False]  # i01 holds r1's 26 blocks: 14 free < r0's 26
    assert result.migration.num_started == 0
