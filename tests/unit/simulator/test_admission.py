"""Live admission in the simulator (SimConfig.live_admission): a request dispatched
while its instance steps joins the engine when the step ends; until then the worker
reports it as a waiting request, so the policies see it all along."""

import dataclasses

from services.policies import LoadModelConfig
from services.simulator.cluster import Simulator
from services.simulator.config import SimConfig
from services.simulator.instance import TOKEN_ID, SimInstance
from services.simulator.workload import SimRequest
from services.worker.engine.config import EngineConfig
from services.worker.engine.cost_model import TINY_CPU


def _instance(now):
    config = EngineConfig(block_size=16, num_kv_blocks=40, max_model_len=256)
    return SimInstance(
        "i00", config, TINY_CPU, LoadModelConfig(), clock=lambda: now[0], live_admission=True
    )


def test_a_request_dispatched_mid_step_joins_when_the_step_ends():
    now = [0.0]
    instance = _instance(now)
    instance.add_request("a", [TOKEN_ID] * 20, 4, 0, 0.0)
    assert instance.start_step() is not None  # a's prefill: busy
    instance.add_request("b", [TOKEN_ID] * 40, 4, 0, 0.0)
    assert list(instance.scheduler.requests) == ["a"] and instance.num_deferred == 1
    # One waiting request of 3 blocks (40 tokens), however long the step takes: the
    # worker reports what reached it (the scheduler's pending entry ends with that).
    for now[0] in (0.4, 5.0):
        load = instance.load()
        assert (load.num_waiting, load.num_waiting_blocks) == (1, 3)
    instance.finish_step()
    assert list(instance.scheduler.requests) == ["a", "b"] and instance.num_deferred == 0
    assert instance.load().num_waiting == 1  # in the engine's queue now


def test_an_idle_instance_admits_at_once():
    now = [0.0]
    instance = _instance(now)
    instance.add_request("a", [TOKEN_ID] * 20, 4, 0, 0.0)
    assert list(instance.scheduler.requests) == ["a"] and instance.num_deferred == 0


def test_every_request_still_finishes_with_live_admission():
    config = SimConfig(
        num_instances=2, profile="tiny-cpu", num_kv_blocks=40, max_model_len=256,
        max_num_batched_tokens=256, policy="recompute",
    )  # fmt: skip
    requests = [SimRequest(f"r{i}", 0.002 * i, 40, 30) for i in range(12)]
    ideal = Simulator(config, requests).run()
    live = Simulator(dataclasses.replace(config, live_admission=True), requests).run()
    assert live.summary.num_requests == ideal.summary.num_requests == 12
    # Requests that arrive mid-step wait for its end either way: TTFTs are equal or later.
    by_id = {r.request_id: r for r in ideal.records}
    assert all(r.first_token_s >= by_id[r.request_id].first_token_s - 1e-9 for r in live.records)


# ---- load reports at step end (SimConfig.load_at_step_end) ----------------------------------


def _reporting_instance(now):
    config = EngineConfig(block_size=16, num_kv_blocks=40, max_model_len=256)
    return SimInstance(
        "i00", config, TINY_CPU, LoadModelConfig(), clock=lambda: now[0], live_admission=True,
        load_at_step_end=True,
    )  # fmt: skip


def test_the_policies_see_the_load_the_last_step_left():
    now = [0.0]
    instance = _reporting_instance(now)
    before = instance.load()  # the empty pool, as the idle worker reported it
    assert (before.num_used_blocks, before.num_waiting, before.num_running) == (0, 0, 0)
    instance.add_request("a", [TOKEN_ID] * 40, 4, 0, 0.0)
    assert instance.start_step() is not None  # a's prefill allocates 3 blocks
    # Mid-step, however long: no snapshot since a arrived, so the worker reports it as
    # waiting (3 blocks for its 40 tokens), not yet as running with its blocks.
    for now[0] in (0.4, 5.0):
        load = instance.load()
        assert (load.num_used_blocks, load.num_running, load.num_waiting) == (0, 0, 1)
        assert load.num_waiting_blocks == 3
    instance.add_request("b", [TOKEN_ID] * 20, 4, 0, 5.0)  # dispatched mid-step
    load = instance.load()
    assert (load.num_waiting, load.num_waiting_blocks) == (2, 5)
    instance.finish_step()  # snapshot: a's 3 blocks (+1 for its first token), b not yet in
    load = instance.load()
    assert (load.num_used_blocks, load.num_running, load.num_waiting) == (3, 1, 1)
    assert load.num_waiting_blocks == 2  # b: admitted after the snapshot, still reported
    assert list(instance.scheduler.requests) == ["a", "b"]
    now[0] = 5.6
    assert instance.start_step() is not None  # a decodes, b's prefill: 2 more blocks
    load = instance.load()
    assert (load.num_used_blocks, load.num_running, load.num_waiting) == (3, 1, 1)
    instance.finish_step()  # this snapshot shows b: no longer counted on its own
    load = instance.load()
    assert (load.num_used_blocks, load.num_running, load.num_waiting) == (5, 2, 0)
    assert load.num_waiting_blocks == 0


def test_exact_loads_are_the_default():
    now = [0.0]
    instance = _instance(now)
    instance.add_request("a", [TOKEN_ID] * 40, 4, 0, 0.0)
    assert instance.start_step() is not None
    load = instance.load()
    assert (load.num_used_blocks, load.num_running) == (3, 1)


def test_every_request_still_finishes_with_step_end_loads():
    config = SimConfig(
        num_instances=2, profile="tiny-cpu", num_kv_blocks=40, max_model_len=256,
        max_num_batched_tokens=256, policy="llmesh", live_admission=True,
    )  # fmt: skip
    requests = [SimRequest(f"r{i}", 0.002 * i, 40, 30) for i in range(12)]
    exact = Simulator(config, requests).run()
    reported = Simulator(dataclasses.replace(config, load_at_step_end=True), requests).run()
    assert reported.summary.num_requests == exact.summary.num_requests == 12
    assert sorted(r.num_output_tokens for r in reported.records) == [30] * 12


def test_leaving_a_group_takes_a_new_snapshot():
    now = [0.0]
    instance = _reporting_instance(now)
    instance.add_request("a", [TOKEN_ID] * 40, 4, 0, 0.0)
    assert instance.start_step() is not None
    assert instance.load().num_used_blocks == 0  # the idle snapshot
    instance.group_id = "g01"  # a member's load is current
    assert instance.load().num_used_blocks == 3
    instance.group_id = ""  # left: the worker reports its own pool again, now
    assert instance.load().num_used_blocks == 3
