"""KunServe's pipeline (pipeline.py): the layer split, the group's pool plan, and
micro-batches in flight on the leader. The whole group runs in test_group.py."""

from __future__ import annotations

import pytest

from services.worker.engine import (
    GroupCapacityError,
    GroupPool,
    InvalidMicroBatchError,
    RequestOutput,
    SamplingParams,
    plan_group_pool,
)
from tests.unit.worker.engine.helpers import collect, random_prompts

PROMPTS = random_prompts(seed=5, num_prompts=3, min_len=6, max_len=12)
PARAMS = SamplingParams(max_tokens=4, ignore_eos=True)


def test_plan_group_pool_puts_members_side_by_side():
    pool = plan_group_pool([10, 7, 12], [40, 31, 35])
    assert pool == GroupPool(num_group_blocks=31, block_offsets=(0, 10, 17))
    assert pool.group_block_ids(2, [0, 5, 11]) == [17, 22, 28]
    # Exactly enough: the old blocks fill the pool.
    assert plan_group_pool([3, 4], [7, 9]) == GroupPool(7, (0, 3))
    with pytest.raises(GroupCapacityError, match=r"can hold 6 blocks .* fewer than its members' 7"):
        plan_group_pool([3, 4], [6, 9])
    with pytest.raises(GroupCapacityError, match="one pool size and one capacity per member"):
        plan_group_pool([3, 4], [9])


def test_requests_in_flight_are_left_out_until_their_micro_batch_is_applied(make_engine):
    engine = make_engine(num_kv_blocks=16, block_size=4)
    reference = make_engine(num_kv_blocks=16, block_size=4)
    expected = {
        f"r{i}": reference.generate([p], PARAMS)[0].new_token_ids for i, p in enumerate(PROMPTS)
    }
    pipeline = engine.pipeline
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"r{i}", prompt, PARAMS, arrival_time=float(i))
    first = pipeline.schedule_micro_batch(max_num_seqs=2, max_num_batched_tokens=64)
    second = pipeline.schedule_micro_batch(max_num_seqs=2, max_num_batched_tokens=64)
    assert [r.request_id for r in first.requests] == ["r0", "r1"]
    assert [r.request_id for r in second.requests] == ["r2"]
    assert pipeline.schedule_micro_batch(max_num_seqs=2, max_num_batched_tokens=64).is_empty
    assert (pipeline.num_in_flight, pipeline.in_flight_request_ids) == (2, {"r0", "r1", "r2"})
    # Applied out of order: r2's micro-batch first, then r0 and r1 run again.
    tokens: dict[str, list[int]] = {}
    second_tokens = pipeline.execute_stage(second).sampled_token_ids
    collect(pipeline.apply_micro_batch(second, second_tokens), tokens)
    assert pipeline.in_flight_request_ids == {"r0", "r1"}
    third = pipeline.schedule_micro_batch(exclude={"r2"})  # the engine's limits
    assert third.is_empty  # r2 held back by the caller, r0 and r1 in flight
    collect(
        pipeline.apply_micro_batch(first, pipeline.execute_stage(first).sampled_token_ids), tokens
    )
    while engine.has_unfinished_requests():
        batch = pipeline.schedule_micro_batch(max_num_seqs=1)
        collect(
            pipeline.apply_micro_batch(batch, pipeline.execute_stage(batch).sampled_token_ids),
            tokens,
        )
    assert tokens == expected
    assert pipeline.num_in_flight == 0


def test_aborted_and_removed_requests_in_flight_are_skipped(make_engine):
    engine = make_engine(num_kv_blocks=16, block_size=4)
    pipeline = engine.pipeline
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"r{i}", prompt, PARAMS, arrival_time=float(i))
    batch = pipeline.schedule_micro_batch()
    sampled = pipeline.execute_stage(batch).sampled_token_ids
    assert engine.abort_request("r0")
    engine.migration.remove_request("r1")  # moved away while in flight: no output
    # A new request under the aborted one's id waits until the old micro-batch is applied.
    engine.add_request("r0", PROMPTS[1], PARAMS, arrival_time=9.0)
    assert pipeline.schedule_micro_batch().is_empty
    outputs = pipeline.apply_micro_batch(batch, sampled)
    assert outputs[0] == RequestOutput("r0", [], 0, True, "abort")
    assert [(o.request_id, o.first_token_index) for o in outputs[1:]] == [("r2", 0)]
    assert engine.scheduler.requests["r0"].num_computed_tokens == 0  # untouched by the old batch
    batch = pipeline.schedule_micro_batch()
    assert [(r.request_id, r.num_computed_tokens) for r in batch.requests] == [
        ("r2", len(PROMPTS[2])),
        ("r0", 0),
    ]
    pipeline.discard_in_flight()
    engine.abort_request("r0")
    engine.abort_request("r2")
    assert [o.request_id for o in pipeline.take_outputs()] == ["r0", "r2"]
    assert pipeline.take_outputs() == []


def test_discarded_micro_batches_run_again_from_where_they_were(make_engine):
    engine = make_engine(num_kv_blocks=16, block_size=4)
    first_token = make_engine(num_kv_blocks=16, block_size=4).generate([PROMPTS[0]], PARAMS)[0]
    pipeline = engine.pipeline
    engine.add_request("r", PROMPTS[0], PARAMS)
    batch = pipeline.schedule_micro_batch()
    pipeline.execute_stage(batch)  # its sampled token is lost with a stage
    assert pipeline.discard_in_flight() == ["r"]
    assert pipeline.num_in_flight == 0
    again = pipeline.schedule_micro_batch()
    assert [(r.request_id, r.num_computed_tokens, r.token_ids) for r in again.requests] == [
        ("r", 0, PROMPTS[0])
    ]
    tokens: dict[str, list[int]] = {}
    collect(
        pipeline.apply_micro_batch(again, pipeline.execute_stage(again).sampled_token_ids), tokens
    )
    assert tokens["r"] == first_token.new_token_ids[:1]
    engine.abort_request("r")
    pipeline.take_outputs()


def test_micro_batch_misuse_is_refused(make_engine):
    engine = make_engine(num_kv_blocks=16, block_size=4)
    pipeline = engine.pipeline
    for name, limits in (
        ("max_num_seqs", {"max_num_seqs": 0}),
        ("max_num_batched_tokens", {"max_num_batched_tokens": True}),
    ):
        with pytest.raises(InvalidMicroBatchError, match=f"{name} must be an int > 0"):
            pipeline.schedule_micro_batch(**limits)
    engine.add_request("r", PROMPTS[0], PARAMS)
    batch = pipeline.schedule_micro_batch()
    with pytest.raises(InvalidMicroBatchError, match="2 sampled tokens for 1 sampling requests"):
        pipeline.apply_micro_batch(batch, [1, 2])
    pipeline.apply_micro_batch(batch, [1])
    with pytest.raises(InvalidMicroBatchError, match="not in flight"):
        pipeline.apply_micro_batch(batch, [1])
    engine.abort_request("r")
    pipeline.take_outputs()
