"""Llumnix live-migration hooks: reserve, copy KV in stages, suspend, import, resume."""

from __future__ import annotations

import pytest
import torch

from services.worker.engine import (
    DuplicateRequestError,
    InvalidBlocksError,
    InvalidLayerRangeError,
    InvalidRequestStateError,
    NoFreeBlocksError,
    RequestState,
    RequestStatus,
    SamplingParams,
    UnknownRequestError,
)
from tests.unit.worker.engine.helpers import collect, migrate, random_prompts, run_to_completion

PROMPT = random_prompts(seed=7, num_prompts=1, min_len=21, max_len=21)[0]
OTHERS = random_prompts(seed=8, num_prompts=3, min_len=5, max_len=30)


def unmoved(make_engine, params: SamplingParams) -> list[int]:
    engine = make_engine(num_kv_blocks=64, block_size=4)
    engine.add_request("r", PROMPT, params)
    return run_to_completion(engine)["r"]


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_tokens=24, ignore_eos=True),
        SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, seed=11, ignore_eos=True),
    ],
    ids=["greedy", "sampled"],
)
def test_migrated_request_continues_exactly_as_unmoved(make_engine, params):
    expected = unmoved(make_engine, params)
    source = make_engine(num_kv_blocks=64, block_size=4)
    destination = make_engine(num_kv_blocks=64, block_size=4)
    for i, prompt in enumerate(OTHERS):  # different neighbours and block ids on each side
        source.add_request(f"src{i}", prompt, SamplingParams(max_tokens=40, ignore_eos=True))
    destination.add_request("dst0", OTHERS[0][::-1], SamplingParams(max_tokens=40, ignore_eos=True))
    destination.step()
    source.add_request("r", PROMPT, params)
    tokens: dict[str, list[int]] = {}
    for _ in range(5):
        collect(source.step(), tokens)
    migrate(source, destination, "r", tokens)
    assert (
        destination.migration.request_block_ids("r")[0] != source.block_manager.num_total_blocks
    )  # moved blocks
    run_to_completion(destination, tokens)
    assert tokens["r"] == expected
    run_to_completion(source)


def test_suspended_request_resumes_where_it_stopped(make_engine):
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    expected = unmoved(make_engine, params)
    engine = make_engine(num_kv_blocks=64, block_size=4)
    engine.add_request("r", PROMPT, params)
    engine.add_request("other", OTHERS[0], params)
    tokens = collect(engine.step(), {})
    engine.migration.suspend_request("r")
    with pytest.raises(InvalidRequestStateError, match="not running"):
        engine.migration.suspend_request("r")
    blocks = engine.migration.request_block_ids("r")
    for _ in range(3):
        collect(engine.step(), tokens)
    assert len(tokens["r"]) == 1 and engine.migration.request_block_ids("r") == blocks
    assert engine.stats().num_suspended == 1
    engine.migration.resume_request("r")
    with pytest.raises(InvalidRequestStateError, match="not suspended"):
        engine.migration.resume_request("r")
    assert run_to_completion(engine, tokens)["r"] == expected


def test_preemption_of_a_migrating_request_is_reported(make_engine):
    engine = make_engine(num_kv_blocks=3, block_size=4)
    preempted = []
    engine.add_preemption_callback(preempted.append)
    engine.add_request("old", [1] * 4, SamplingParams(max_tokens=8, ignore_eos=True))
    engine.add_request("migrating", [2] * 4, SamplingParams(max_tokens=8, ignore_eos=True))
    engine.step()
    engine.step()
    assert preempted == ["migrating"]  # the llumlet aborts the migration on this
    with pytest.raises(InvalidRequestStateError):
        engine.migration.suspend_request("migrating")  # waiting now, nothing to stop-and-copy
    assert engine.migration.request_block_ids("migrating") == []
    run_to_completion(engine)


def test_import_rejects_bad_blocks_and_states(make_engine):
    source = make_engine(num_kv_blocks=16, block_size=4)
    destination = make_engine(num_kv_blocks=16, block_size=4)
    source.add_request("r", [5] * 9, SamplingParams(max_tokens=4, ignore_eos=True))
    source.step()
    state = source.migration.export_request_state("r")  # 9 tokens computed: 3 blocks
    assert (state.num_computed_tokens, state.num_tokens) == (9, 10)
    reserved = destination.migration.reserve_blocks(3)
    assert reserved == [0, 1, 2]
    with pytest.raises(InvalidBlocksError, match="2 blocks cannot hold 9 tokens"):
        destination.migration.import_request(state, reserved[:2])
    with pytest.raises(InvalidBlocksError, match="not reserved"):
        destination.migration.import_request(state, [0, 1, 5])
    with pytest.raises(InvalidRequestStateError, match="num_computed_tokens=10"):
        destination.migration.import_request(
            RequestState(**{**state.__dict__, "num_computed_tokens": 10}), reserved
        )
    finished = RequestState(**{**state.__dict__, "output_token_ids": (1, 2, 3, 4)})
    with pytest.raises(InvalidRequestStateError, match="already finished"):
        destination.migration.import_request(finished, reserved)
    stopped = RequestState(
        **{**state.__dict__, "output_token_ids": (257,), "params": SamplingParams(max_tokens=4)}
    )
    with pytest.raises(InvalidRequestStateError, match="already finished"):
        destination.migration.import_request(stopped, reserved)  # its last token was EOS
    destination.migration.import_request(state, reserved)
    with pytest.raises(DuplicateRequestError):
        destination.migration.import_request(state, [])
    assert destination.migration.request_block_ids("r") == [0, 1, 2]
    assert destination.request_status("r") is RequestStatus.RUNNING
    destination.abort_request("r")
    source.abort_request("r")


def test_reservations_are_bounded_and_released(make_engine):
    engine = make_engine(num_kv_blocks=4, block_size=4)
    with pytest.raises(NoFreeBlocksError, match="cannot reserve 5 blocks: 4 free"):
        engine.migration.reserve_blocks(5)
    reserved = engine.migration.reserve_blocks(4)
    engine.add_request("r", [1, 2], SamplingParams(max_tokens=2))
    assert engine.step() == []  # no room while the reservation holds every block
    assert engine.stats().num_hol_blocks == 1
    engine.migration.release_blocks(reserved)
    assert len(run_to_completion(engine)["r"]) == 2
    with pytest.raises(InvalidBlocksError):
        engine.migration.release_blocks(reserved)


def test_read_kv_blocks_into_a_given_buffer(make_engine):
    engine = make_engine(num_kv_blocks=8, block_size=4)
    engine.add_request("r", [5, 9, 2, 7, 1, 3, 8, 4, 6], SamplingParams(max_tokens=2))
    engine.step()
    blocks = engine.migration.request_block_ids("r")[::-1]  # any order: data follows the ids given
    kv = engine.kv_cache
    expected = torch.stack(
        [
            kv.layers[i][:, :, blocks].permute(0, 2, 3, 1, 4)
            for i in range(kv.layer_start, kv.layer_end)
        ]
    )
    assert expected.abs().sum() > 0
    out = torch.full(kv.block_shape(len(blocks)), float("nan"))
    assert engine.migration.read_kv_blocks(blocks, out=out) is out
    assert torch.equal(out, expected) and torch.equal(
        engine.migration.read_kv_blocks(blocks), expected
    )
    with pytest.raises(InvalidBlocksError, match="expected contiguous"):
        engine.migration.read_kv_blocks(blocks, out=torch.empty(kv.block_shape(len(blocks) + 1)))
    with pytest.raises(InvalidBlocksError, match="dtype"):
        engine.migration.read_kv_blocks(blocks, out=out.double())
    run_to_completion(engine)


def test_read_and_write_kv_blocks_shapes(make_engine):
    engine = make_engine(num_kv_blocks=8, block_size=4)
    engine.add_request("r", [3] * 6, SamplingParams(max_tokens=2))
    engine.step()
    blocks = engine.migration.request_block_ids("r")
    data = engine.migration.read_kv_blocks(blocks)
    assert tuple(data.shape) == (
        4,
        2,
        2,
        4,
        2,
        32,
    )  # (layers, K/V, blocks, block_size, kv heads, head dim)
    assert data.is_contiguous()
    assert data.numel() * data.element_size() == 2 * engine.kv_block_nbytes
    assert data[:, :, 1, 2:].abs().sum() == 0  # slots past the 6 computed tokens are untouched
    spare = engine.migration.reserve_blocks(2)
    engine.migration.write_kv_blocks(spare, data)
    assert engine.migration.read_kv_blocks(spare).equal(data)
    with pytest.raises(ValueError, match="expected"):
        engine.migration.write_kv_blocks(spare[:1], data)
    with pytest.raises(InvalidBlocksError):
        engine.migration.read_kv_blocks([8])
    engine.migration.release_blocks(spare)
    with pytest.raises(UnknownRequestError):
        engine.migration.request_block_ids("nobody")
    run_to_completion(engine)


def test_remove_request_emits_nothing_and_frees_blocks(make_engine):
    engine = make_engine(num_kv_blocks=8, block_size=4)
    engine.add_request("r", [3] * 6, SamplingParams(max_tokens=5))
    engine.add_request("w", [3] * 6, SamplingParams(max_tokens=5), arrival_time=1e12)
    engine.step()
    engine.migration.remove_request("r")
    assert engine.stats().num_used_blocks == 2
    assert all(o.request_id == "w" for o in engine.step())
    engine.migration.remove_request("w")
    assert engine.step() == []
    assert not engine.has_unfinished_requests()


# ---- KunServe group: a layer range's KV, adoption at given block ids ---------------------


def test_read_kv_layers_reads_a_layer_range_of_the_blocks(make_engine):
    engine = make_engine(num_kv_blocks=8, block_size=4)
    engine.add_request("r", [3, 1, 4, 1, 5, 9], SamplingParams(max_tokens=2))
    engine.step()
    blocks = engine.migration.request_block_ids("r")
    every_layer = engine.migration.read_kv_blocks(blocks)
    middle = engine.migration.read_kv_layers(blocks, 1, 3)
    assert tuple(middle.shape) == (2, 2, 2, 4, 2, 32)  # (layers 1-2, K/V, blocks, bs, nkv, hd)
    assert torch.equal(middle, every_layer[1:3])
    out = torch.empty(engine.kv_cache.block_shape(len(blocks), 1))
    assert engine.migration.read_kv_layers(blocks, 3, 4, out=out) is out
    assert torch.equal(out, every_layer[3:])
    for start, end in ((2, 2), (0, 5), (-1, 1)):
        with pytest.raises(InvalidLayerRangeError, match=rf"layers \[{start}, {end}\) are not"):
            engine.migration.read_kv_layers(blocks, start, end)
    with pytest.raises(InvalidBlocksError, match="expected contiguous"):
        engine.migration.read_kv_layers(blocks, 0, 2, out=out)
    with pytest.raises(InvalidBlocksError, match="distinct ints"):
        engine.migration.read_kv_layers([0, 0], 0, 2)
    run_to_completion(engine)


def test_import_request_at_adopts_the_given_free_blocks(make_engine):
    source = make_engine(num_kv_blocks=8, block_size=4)
    leader = make_engine(num_kv_blocks=16, block_size=4)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    expected = make_engine(num_kv_blocks=8, block_size=4).generate([[5] * 9], params)[0]
    source.add_request("r", [5] * 9, params)
    tokens = collect(source.step(), {})
    blocks = source.migration.request_block_ids("r")  # 9 tokens computed: [0, 1, 2]
    data = source.migration.read_kv_blocks(blocks)
    state = source.migration.remove_request("r")
    leader.add_request("other", [1] * 4, params)
    leader.step()  # "other" holds block 0
    group_ids = [10 + b for b in blocks]  # e.g. a member's blocks at offset 10
    assert not leader.migration.can_import_at([0, 11])
    with pytest.raises(InvalidBlocksError, match=r"blocks \[0\] are in use"):
        leader.migration.import_request_at(state, [0, 11, 12])
    with pytest.raises(InvalidBlocksError, match=r"distinct ints in \[0, 16\)"):
        leader.migration.import_request_at(state, [10, 11, 16])
    with pytest.raises(InvalidBlocksError, match="2 blocks cannot hold 9 tokens"):
        leader.migration.import_request_at(state, group_ids[:2])
    assert leader.block_manager.num_free_blocks == 15  # refusals take nothing
    assert leader.migration.can_import_at(group_ids)
    leader.migration.write_kv_blocks(group_ids, data)
    leader.migration.import_request_at(state, group_ids)
    assert leader.migration.request_block_ids("r") == [10, 11, 12]
    # A request with nothing computed queues as waiting and takes no blocks.
    waiting = RequestState("w", (7,) * 5, (), params, 0, num_computed_tokens=0, arrival_time=9.0)
    leader.migration.import_request_at(waiting, [])
    assert leader.request_status("w") is RequestStatus.WAITING
    run_to_completion(leader, tokens)
    assert tokens["r"] == expected.new_token_ids
