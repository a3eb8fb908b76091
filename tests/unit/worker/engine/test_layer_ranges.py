"""KunServe hooks (layer_ranges.py): layer-range execution, drop and restore with exact
byte accounting."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from services.policies.groups import split_layers
from services.worker.engine import (
    EngineStateError,
    GroupCapacityError,
    InvalidBlocksError,
    InvalidLayerRangeError,
    InvalidRequestStateError,
    NoFreeBlocksError,
    RequestState,
    SamplingParams,
    plan_group_pool,
)
from tests.unit.worker.engine.helpers import (
    collect,
    random_prompts,
    run_to_completion,
    weight_digest,
)

MiB = 1024 * 1024
PROMPTS = random_prompts(seed=3, num_prompts=4, min_len=5, max_len=40)
PARAMS = SamplingParams(max_tokens=10, ignore_eos=True)

# Independent arithmetic for the tiny model (fp32, blocks of 16).
LAYER_BYTES = 4 * (256 * (256 + 64 + 64) + 256 * 256 + 3 * 256 * 768 + 2 * 256)
EMBED_BYTES = 4 * 258 * 256
FULL_WEIGHT_BYTES = 4 * LAYER_BYTES + 2 * EMBED_BYTES + 4 * 256  # + lm_head + final norm
BLOCK_BYTES_PER_LAYER = 16 * 2 * 2 * 32 * 4  # block_size * (K, V) * kv heads * head dim * fp32


def test_layer_ranges_chained_equal_the_full_model(make_engine):
    engine = make_engine(num_kv_blocks=8)
    model = engine.model
    ids = torch.tensor(PROMPTS[0])
    positions = torch.arange(len(ids))
    with torch.inference_mode():
        full = model.forward_layers(model.embed(ids), positions, model.dense_attention)
        first = model.forward_layers(model.embed(ids), positions, model.dense_attention, 0, 2)
        chained = model.forward_layers(first, positions, model.dense_attention, 2, 4)
    assert torch.equal(chained, full)
    assert torch.equal(model.compute_logits(chained), model.forward_dense(PROMPTS[0]))


def test_two_pipeline_stages_generate_what_the_full_engine_does(make_engine):
    full = make_engine(num_kv_blocks=64)
    for i, prompt in enumerate(PROMPTS):
        full.add_request(f"r{i}", prompt, PARAMS)
    expected = run_to_completion(full)

    first, second = make_engine(num_kv_blocks=64), make_engine(num_kv_blocks=64)
    first.layer_ranges.drop_layers(0, 2)
    second.layer_ranges.drop_layers(2, 4)
    assert first.block_manager.num_total_blocks == second.block_manager.num_total_blocks
    for i, prompt in enumerate(PROMPTS):
        first.add_request(f"r{i}", prompt, PARAMS)
    with pytest.raises(EngineStateError, match=r"holds layers \[0, 2\) only"):
        first.step()
    # The first stage schedules; both stages execute the same batch over their own KV pools.
    got: dict[str, list[int]] = {}
    while first.scheduler.requests:
        batch = first.scheduler.schedule()
        hidden = first.executor.execute(batch).hidden_states
        assert hidden is not None and hidden.shape == (batch.num_batched_tokens, 256)
        sampled = second.executor.execute(batch, hidden).sampled_token_ids
        for out in first.scheduler.update_from_output(batch, sampled):
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
    assert got == expected


def test_drop_layers_turns_freed_bytes_into_blocks(make_engine):
    engine = make_engine(memory_capacity_bytes=16 * MiB)
    num_blocks = (16 * MiB - FULL_WEIGHT_BYTES) // (4 * BLOCK_BYTES_PER_LAYER)
    assert engine.weight_nbytes == FULL_WEIGHT_BYTES
    assert engine.kv_block_nbytes == 4 * BLOCK_BYTES_PER_LAYER
    assert engine.block_manager.num_total_blocks == num_blocks
    assert engine.kv_cache.nbytes == num_blocks * 4 * BLOCK_BYTES_PER_LAYER

    engine.add_request("r", PROMPTS[1], SamplingParams(max_tokens=30, ignore_eos=True))
    engine.step()
    blocks, kv_before = (
        engine.migration.request_block_ids("r"),
        engine.migration.read_kv_blocks(engine.migration.request_block_ids("r")),
    )

    change = engine.layer_ranges.drop_layers(2, 4)  # a last stage: layers 2, 3, final norm, lm_head
    kept_weight_bytes = 2 * LAYER_BYTES + EMBED_BYTES + 4 * 256
    pool_bytes = num_blocks * 4 * BLOCK_BYTES_PER_LAYER + (FULL_WEIGHT_BYTES - kept_weight_bytes)
    new_num_blocks = pool_bytes // (2 * BLOCK_BYTES_PER_LAYER)
    assert (change.weight_nbytes_before, change.weight_nbytes_after) == (
        FULL_WEIGHT_BYTES,
        kept_weight_bytes,
    )
    assert change.freed_weight_nbytes == 2 * LAYER_BYTES + EMBED_BYTES
    assert (change.kv_block_nbytes_before, change.kv_block_nbytes_after) == (
        4 * BLOCK_BYTES_PER_LAYER,
        2 * BLOCK_BYTES_PER_LAYER,
    )
    assert (change.num_total_blocks_before, change.num_total_blocks_after) == (
        num_blocks,
        new_num_blocks,
    )
    assert new_num_blocks > 2 * num_blocks  # halved block size, plus the weights' bytes
    assert engine.weight_nbytes == kept_weight_bytes
    assert engine.kv_cache.nbytes == new_num_blocks * 2 * BLOCK_BYTES_PER_LAYER
    assert engine.block_manager.num_free_blocks == new_num_blocks - len(blocks)
    assert engine.migration.request_block_ids("r") == blocks  # block ids survive a drop
    assert torch.equal(
        engine.migration.read_kv_blocks(blocks), kv_before[2:]
    )  # kept layers' KV intact
    engine.check_integrity()

    change = engine.layer_ranges.restore_layers()  # from the tiny seed; "r" recomputes its KV
    assert (change.weight_nbytes_after, change.num_total_blocks_after) == (
        FULL_WEIGHT_BYTES,
        num_blocks,
    )
    assert engine.kv_cache.nbytes == num_blocks * 4 * BLOCK_BYTES_PER_LAYER
    assert (
        engine.migration.request_block_ids("r") == []
    )  # preempted to recompute the restored layers
    assert engine.stats().num_preemptions == 1
    tokens = run_to_completion(engine)["r"]  # the first token came before the drop
    reference = make_engine(num_kv_blocks=8).generate(
        [PROMPTS[1]], SamplingParams(max_tokens=30, ignore_eos=True)
    )
    assert tokens[1:] == reference[0].new_token_ids[1:]


def test_restore_moves_blocks_beyond_the_original_pool(make_engine):
    engine = make_engine(num_kv_blocks=4, block_size=4)
    engine.layer_ranges.drop_layers(0, 2)
    assert engine.block_manager.num_total_blocks > 8
    low = engine.migration.reserve_blocks(4)
    high = engine.migration.reserve_blocks(2)
    assert high == [4, 5]
    kv = torch.randn(2, 2, 2, 4, 2, 32)  # (layers 0-1, K/V, blocks, block_size, kv heads, head dim)
    engine.migration.write_kv_blocks(high, kv)
    state = RequestState("r", (7,) * 6, (9,), PARAMS, 0, num_computed_tokens=6, arrival_time=0.0)
    engine.migration.import_request(state, high)
    engine.migration.release_blocks(low)
    engine.layer_ranges.restore_layers(recompute=False)  # the caller will write layers 2, 3 itself
    assert engine.block_manager.num_total_blocks == 4
    moved = engine.migration.request_block_ids("r")
    assert moved == [0, 1]  # free ids below 4, in free-list order
    assert torch.equal(
        engine.migration.read_kv_blocks(moved)[:2], kv
    )  # contents moved with the ids
    assert (
        engine.migration.read_kv_blocks(moved)[2:].abs().sum() == 0
    )  # restored layers: zero until written
    engine.abort_request("r")
    engine.step()


def test_restore_refuses_when_used_blocks_do_not_fit(make_engine):
    engine = make_engine(num_kv_blocks=2, block_size=4)
    engine.layer_ranges.drop_layers(0, 2)
    reserved = engine.migration.reserve_blocks(3)
    with pytest.raises(NoFreeBlocksError, match="3 blocks are in use"):
        engine.layer_ranges.restore_layers()
    engine.migration.release_blocks(reserved)
    with pytest.raises(InvalidRequestStateError, match=r"cannot keep layers \[1, 3\)"):
        engine.layer_ranges.drop_layers(1, 3)
    engine.layer_ranges.restore_layers()
    with pytest.raises(InvalidRequestStateError, match="no layers are dropped"):
        engine.layer_ranges.restore_layers()


def test_simulated_engine_drops_layers_by_accounting_only(make_simulated_engine):
    engine = make_simulated_engine("llama-7b-a10", memory_capacity_bytes=21_600_000_000)
    assert engine.kv_cache is None and engine.model is None
    weight_bytes = 2 * (
        32 * (4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096) + 2 * 32000 * 4096 + 4096
    )
    assert (
        engine.weight_nbytes == weight_bytes == 13_476_831_232
    )  # Llama-2-7B's 6.74e9 params in fp16
    assert engine.kv_block_nbytes == 16 * 2 * 32 * 4096 * 2  # 0.5 MiB per token
    assert (
        engine.block_manager.num_total_blocks
        == (21_600_000_000 - weight_bytes) // (16 * 524288)
        == 968
    )
    engine.add_request("r", [1] * 100, PARAMS)
    batch = engine.scheduler.schedule()
    full_step_time = engine.executor.step_time(batch)
    change = engine.layer_ranges.drop_layers(0, 16)  # KunServe, group of 2: the first half
    assert engine.executor.step_time(batch) == pytest.approx(full_step_time / 2)
    engine.scheduler.update_from_output(batch, [5])
    engine.abort_request("r")
    assert change.kv_block_nbytes_after == change.kv_block_nbytes_before // 2
    assert (
        change.num_total_blocks_after
        == (968 * change.kv_block_nbytes_before + change.freed_weight_nbytes)
        // change.kv_block_nbytes_after
        == 3542
    )
    engine.layer_ranges.restore_layers()
    assert engine.block_manager.num_total_blocks == 968


def test_restore_from_the_host_copy(make_engine, monkeypatch):
    engine = make_engine(num_kv_blocks=16)
    expected = engine.generate([PROMPTS[2]], PARAMS)[0].new_token_ids
    engine.layer_ranges.drop_layers(1, 4, keep_host_copy=True)
    held = engine.layer_ranges.held
    assert sorted(held.host_weights)[:2] == [
        "model.embed_tokens.weight",
        "model.layers.0.input_layernorm.weight",
    ]
    monkeypatch.setattr(held.weight_source, "load", lambda names: pytest.fail("read the source"))
    engine.layer_ranges.restore_layers()
    assert held.host_weights == {}
    assert engine.generate([PROMPTS[2]], PARAMS)[0].new_token_ids == expected


# ---- KunServe group: capacity, join, leave ------------------------------------------------


def test_group_capacity_is_what_the_memory_holds_beside_the_kept_weights(make_engine):
    engine = make_engine(memory_capacity_bytes=16 * MiB)
    head_bytes = EMBED_BYTES + 4 * 256  # lm_head + final norm
    assert engine.layer_ranges.group_capacity(0, 2) == (
        16 * MiB - 2 * LAYER_BYTES - EMBED_BYTES
    ) // (2 * BLOCK_BYTES_PER_LAYER)
    assert engine.layer_ranges.group_capacity(1, 3) == (16 * MiB - 2 * LAYER_BYTES) // (
        2 * BLOCK_BYTES_PER_LAYER
    )
    assert (
        engine.layer_ranges.group_capacity(3, 4)
        == (16 * MiB - LAYER_BYTES - head_bytes) // BLOCK_BYTES_PER_LAYER
    )
    assert engine.layer_ranges.group_capacity(0, 4) == engine.block_manager.num_total_blocks
    assert engine.weight_nbytes == FULL_WEIGHT_BYTES  # pure arithmetic: nothing dropped
    for keep in ((2, 2), (3, 5), (-1, 2)):
        with pytest.raises(InvalidLayerRangeError, match=r"cannot keep layers"):
            engine.layer_ranges.group_capacity(*keep)
    # A pool sized exactly (num_kv_blocks) grows into the bytes it holds, not the capacity.
    exact = make_engine(num_kv_blocks=8)
    assert exact.layer_ranges.group_capacity(0, 2) == (
        FULL_WEIGHT_BYTES + 8 * 4 * BLOCK_BYTES_PER_LAYER - 2 * LAYER_BYTES - EMBED_BYTES
    ) // (2 * BLOCK_BYTES_PER_LAYER)


def test_join_group_frees_the_other_layers_and_offsets_the_old_blocks(make_engine):
    engine = make_engine(num_kv_blocks=6)
    digest = weight_digest(engine)
    engine.add_request("r", PROMPTS[1] + PROMPTS[0], PARAMS)  # 41 tokens: blocks 0, 1, 2
    collect(engine.step(), tokens := {})
    kv = engine.migration.read_kv_blocks([0, 1, 2])
    with pytest.raises(EngineStateError, match="needs an engine without requests"):
        engine.layer_ranges.join_group(2, 4, 20, 7)
    state = engine.migration.remove_request("r")
    with pytest.raises(GroupCapacityError, match="cannot take this engine's 6 blocks at offset 15"):
        engine.layer_ranges.join_group(2, 4, 20, 15)
    capacity = engine.layer_ranges.group_capacity(2, 4)
    with pytest.raises(GroupCapacityError, match=f"holds at most {capacity} blocks"):
        engine.layer_ranges.join_group(2, 4, capacity + 1, 0)
    dropped = [
        weakref.ref(engine.model.weights.layers[1].gate_up_proj),
        weakref.ref(engine.model.weights.embed_tokens),
        weakref.ref(engine.kv_cache.layers[0]),
    ]

    change = engine.layer_ranges.join_group(2, 4, 20, 7)
    gc.collect()
    assert [ref() for ref in dropped] == [None, None, None]  # freed for real
    kept_weight_bytes = 2 * LAYER_BYTES + EMBED_BYTES + 4 * 256
    assert (change.layer_start, change.layer_end) == (2, 4)
    assert (change.weight_nbytes_before, change.weight_nbytes_after) == (
        FULL_WEIGHT_BYTES,
        kept_weight_bytes,
    )
    assert change.freed_weight_nbytes == 2 * LAYER_BYTES + EMBED_BYTES
    assert (change.kv_block_nbytes_before, change.kv_block_nbytes_after) == (
        4 * BLOCK_BYTES_PER_LAYER,
        2 * BLOCK_BYTES_PER_LAYER,
    )
    assert (change.num_total_blocks_before, change.num_total_blocks_after) == (6, 20)
    assert sorted(engine.kv_cache.layers) == [2, 3]
    assert engine.kv_cache.nbytes == 20 * 2 * BLOCK_BYTES_PER_LAYER
    assert (engine.block_manager.num_total_blocks, engine.block_manager.num_free_blocks) == (20, 20)
    # Old block i is group block 7 + i; every other group block is zero.
    assert torch.equal(engine.migration.read_kv_blocks([7, 8, 9]), kv[2:])
    others = [b for b in range(20) if b not in (7, 8, 9)]
    assert engine.migration.read_kv_blocks(others).abs().sum() == 0

    # Leave: group blocks 7, 8, 9 become local 4, 0, 2; layers 0-1 are the caller's to write.
    with pytest.raises(
        InvalidBlocksError, match=r"local block ids must be distinct ints in \[0, 6\)"
    ):
        engine.layer_ranges.leave_group({7: 4, 8: 6})
    with pytest.raises(
        InvalidBlocksError, match=r"group block ids must be distinct ints in \[0, 20\)"
    ):
        engine.layer_ranges.leave_group({20: 0})
    change = engine.layer_ranges.leave_group({7: 4, 8: 0, 9: 2})  # weights: the tiny seed
    assert (change.layer_start, change.layer_end, change.num_total_blocks_after) == (0, 4, 6)
    assert change.weight_nbytes_after == FULL_WEIGHT_BYTES
    assert weight_digest(engine) == digest
    assert engine.kv_cache.nbytes == 6 * 4 * BLOCK_BYTES_PER_LAYER
    local = engine.migration.read_kv_blocks([4, 0, 2])
    assert torch.equal(local[2:], kv[2:])
    assert (
        local[:2].abs().sum() == 0 and engine.migration.read_kv_blocks([1, 3, 5]).abs().sum() == 0
    )
    with pytest.raises(InvalidLayerRangeError, match="no layers are dropped"):
        engine.layer_ranges.leave_group({})
    # The request continues at its new ids once layers 0-1 are written back.
    engine.migration.import_request_at(state, [4, 0, 2])
    engine.migration.write_kv_blocks([4, 0, 2], kv[:2], layer_start=0)
    run_to_completion(engine, tokens)
    reference = make_engine(num_kv_blocks=8).generate([PROMPTS[1] + PROMPTS[0]], PARAMS)
    assert tokens["r"] == reference[0].new_token_ids


@pytest.mark.parametrize(("g", "limit"), [(2, 1.61), (4, 1.92)])
def test_a_group_holds_the_kunserve_share_of_tokens(make_engine, g, limit):
    """Weights 55% of each member's memory (a 7B on a 24 GB GPU): the group holds
    (g - w) / (g (1 - w)) times the tokens of its members, less what the embedding and
    lm_head cost the first and last stages beyond their 1/g share of the weights."""
    memory = FULL_WEIGHT_BYTES * 100 // 55
    members = [make_engine(memory_capacity_bytes=memory) for _ in range(g)]
    ranges = split_layers(4, g)
    num_blocks = members[0].block_manager.num_total_blocks
    capacities = [m.layer_ranges.group_capacity(*ranges[r]) for r, m in enumerate(members)]
    pool = plan_group_pool([num_blocks] * g, capacities)
    for r, member in enumerate(members):
        member.layer_ranges.join_group(*ranges[r], pool.num_group_blocks, pool.block_offsets[r])
        assert member.weight_nbytes + member.kv_cache.nbytes <= memory
    tokens_before, tokens_after = g * num_blocks * 16, pool.num_group_blocks * 16
    assert members[0].block_manager.num_total_blocks * 16 == tokens_after

    w = FULL_WEIGHT_BYTES / memory
    formula = (g - w) / (g * (1 - w))
    assert formula == pytest.approx(limit, abs=0.01)
    heaviest = max(m.weight_nbytes for m in members)  # a stage with the embedding or the head
    shortfall = g * (heaviest - FULL_WEIGHT_BYTES / g) / (g * memory - FULL_WEIGHT_BYTES)
    rounding = 1 / num_blocks + 1 / pool.num_group_blocks  # whole blocks, before and after
    ratio = tokens_after / tokens_before
    assert formula * (1 - shortfall - rounding) <= ratio <= formula * (1 + rounding)
    assert shortfall < (0.002 if g == 2 else 0.01)  # the tiny model's embedding: 2% of it
    for member in members:
        member.layer_ranges.leave_group({})


def test_simulated_engine_joins_and_leaves_a_group_by_accounting_only(make_simulated_engine):
    engine = make_simulated_engine("llama-7b-a10", memory_capacity_bytes=21_600_000_000)
    weight_bytes = 13_476_831_232
    first_half = 2 * (16 * (4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096) + 32000 * 4096)
    capacity = engine.layer_ranges.group_capacity(0, 16)
    assert capacity == (21_600_000_000 - first_half) // (16 * 2 * 16 * 4096 * 2) == 3543
    change = engine.layer_ranges.join_group(0, 16, 3000, 968)
    assert engine.executor.cost_model.layer_fraction == 0.5
    assert (change.weight_nbytes_before, change.weight_nbytes_after) == (weight_bytes, first_half)
    assert engine.block_manager.num_total_blocks == 3000
    engine.layer_ranges.leave_group({968: 0})
    assert engine.executor.cost_model.layer_fraction == 1.0
    assert engine.block_manager.num_total_blocks == 968
    with pytest.raises(EngineStateError, match="no weight tensors"):
        engine.layer_ranges.export_weights()
