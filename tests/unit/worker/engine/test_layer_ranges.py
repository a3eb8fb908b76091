"""KunServe hooks (layer_ranges.py): layer-range execution, drop and restore with exact
byte accounting."""

from __future__ import annotations

import pytest
import torch

from services.worker.engine import (
    EngineStateError,
    InvalidRequestStateError,
    NoFreeBlocksError,
    RequestState,
    SamplingParams,
)
from tests.unit.worker.engine.helpers import random_prompts, run_to_completion

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
