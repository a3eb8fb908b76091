"""The paged engine against the dense no-cache reference, and its request API."""

from __future__ import annotations

import functools

import pytest

from services.worker.engine import (
    DuplicateRequestError,
    EmptyPromptError,
    EngineInputError,
    InvalidRequestIdError,
    InvalidSamplingParamsError,
    InvalidTokenError,
    PromptTooLongError,
    RequestStatus,
    SamplingParams,
    UnknownRequestError,
)
from tests.unit.worker.engine.helpers import (
    collect,
    dense_greedy,
    random_prompts,
    run_to_completion,
)

MAX_TOKENS = 10
PROMPTS = random_prompts(seed=1, num_prompts=12, min_len=1, max_len=40)


@functools.cache
def reference(prompt: tuple[int, ...]) -> list[int]:
    from services.worker.engine import EngineConfig, LLMEngine

    engine = LLMEngine.from_config(
        EngineConfig(num_kv_blocks=1, memory_capacity_bytes=64 * 1024 * 1024)
    )
    return dense_greedy(engine, list(prompt), MAX_TOKENS)


@pytest.mark.parametrize(
    ("block_size", "num_kv_blocks", "batch_size", "max_num_batched_tokens"),
    [
        (16, 256, 12, 512),  # roomy: everything at once
        (4, 256, 5, 512),  # small blocks
        (1, 512, 12, 64),  # one token per block, chunked prefill
        (8, 14, 12, 32),  # tiny pool: preemption by recompute, chunked prefill
        (16, 5, 3, 16),  # tiny pool, big blocks, budget below most prompts
    ],
)
@pytest.mark.parametrize("kernels", ["native", "torch"])
def test_paged_engine_matches_dense_reference(
    make_engine, block_size, num_kv_blocks, batch_size, max_num_batched_tokens, kernels
):
    engine = make_engine(
        kernels=kernels,
        block_size=block_size,
        num_kv_blocks=num_kv_blocks,
        max_num_batched_tokens=max_num_batched_tokens,
    )
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    outputs: dict[str, list[int]] = {}
    for start in range(0, len(PROMPTS), batch_size):
        for i in range(start, min(start + batch_size, len(PROMPTS))):
            engine.add_request(f"r{i}", PROMPTS[i], params)
        outputs.update(run_to_completion(engine))
    for i, prompt in enumerate(PROMPTS):
        assert outputs[f"r{i}"] == reference(tuple(prompt)), f"prompt {i}"
    if num_kv_blocks < 20:
        assert engine.stats().num_preemptions > 0


def test_sampled_tokens_do_not_depend_on_batch_or_preemption(make_engine):
    params = [
        SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, top_k=40, seed=i, ignore_eos=True)
        for i in range(6)
    ]
    prompts = PROMPTS[:6]

    def run(engine, together: bool) -> dict[str, list[int]]:
        outputs = {}
        for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
            engine.add_request(f"s{i}", prompt, p)
            if not together:
                outputs.update(run_to_completion(engine))
        outputs.update(run_to_completion(engine))
        return outputs

    alone = run(make_engine(num_kv_blocks=64), together=False)
    crowded = run(
        make_engine(num_kv_blocks=7, block_size=8, max_num_batched_tokens=24), together=True
    )
    assert crowded == alone
    assert len(set(map(tuple, alone.values()))) == 6
    # Seeds, not luck: the same seed gives the same tokens, another seed others.
    again = run(make_engine(num_kv_blocks=64), together=True)
    assert again == alone


def test_greedy_is_the_limit_of_top_k_1(make_engine):
    engine = make_engine(num_kv_blocks=32)
    greedy = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=8, ignore_eos=True))[0]
    top1 = engine.generate(
        [PROMPTS[0]],
        SamplingParams(max_tokens=8, temperature=1.5, top_k=1, seed=3, ignore_eos=True),
    )[0]
    assert top1.new_token_ids == greedy.new_token_ids == reference(tuple(PROMPTS[0]))[:8]


@pytest.mark.parametrize(
    ("prompt", "error", "message"),
    [
        ([], EmptyPromptError, "no tokens"),
        ([1, -1], InvalidTokenError, "-1"),
        ([1, 258], InvalidTokenError, "258"),
        ([1, "a"], InvalidTokenError, "'a'"),
        ([1, 2.0], InvalidTokenError, "2.0"),
        ([True], InvalidTokenError, "True"),
        ("hello", InvalidTokenError, "str"),
        ([1] * 65, PromptTooLongError, "65 tokens; the model context is 64"),
    ],
)
def test_bad_prompts_raise_engine_input_errors(make_engine, prompt, error, message):
    engine = make_engine(num_kv_blocks=16, max_model_len=64)
    with pytest.raises(error, match=message) as info:
        engine.add_request("bad", prompt, SamplingParams())
    assert isinstance(info.value, EngineInputError) and isinstance(info.value, ValueError)
    assert not engine.has_unfinished_requests()
    assert engine.generate([[1, 2, 3]], SamplingParams(max_tokens=2))[0].finished  # still serving


def test_prompt_larger_than_the_whole_kv_pool_is_rejected(make_engine):
    engine = make_engine(num_kv_blocks=2, block_size=4)
    with pytest.raises(PromptTooLongError, match="9 tokens; the whole KV pool holds 8"):
        engine.add_request("big", [1] * 9, SamplingParams())


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -3}, "max_tokens"),
        ({"max_tokens": 2.5}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"seed": "x"}, "seed"),
        ({"stop_token_ids": (1, -2)}, "stop_token_ids"),
        ({"ignore_eos": 1}, "ignore_eos"),
    ],
)
def test_bad_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(InvalidSamplingParamsError, match=f"SamplingParams.{field} must be"):
        SamplingParams(**kwargs)


def test_stop_token_outside_vocab_and_duplicate_ids(make_engine):
    engine = make_engine(num_kv_blocks=16)
    with pytest.raises(InvalidRequestIdError):
        engine.add_request("", [1], SamplingParams())
    with pytest.raises(InvalidSamplingParamsError, match="stop_token_ids"):
        engine.add_request("a", [1], SamplingParams(stop_token_ids=(999,)))
    engine.add_request("a", [1], SamplingParams())
    with pytest.raises(DuplicateRequestError, match="'a'"):
        engine.add_request("a", [1], SamplingParams())
    assert engine.abort_request("a")
    assert not engine.abort_request("a")
    assert not engine.abort_request("nobody")
    with pytest.raises(UnknownRequestError):
        engine.migration.export_request_state("nobody")
    assert [(o.request_id, o.finish_reason) for o in engine.step()] == [("a", "abort")]


def test_abort_frees_blocks_and_reports_once(make_engine):
    engine = make_engine(num_kv_blocks=16, block_size=4)
    engine.add_request("a", [1, 2, 3, 4, 5], SamplingParams(max_tokens=50, ignore_eos=True))
    engine.add_request("b", [1, 2], SamplingParams(max_tokens=50, ignore_eos=True))
    first = engine.step()
    assert [(o.request_id, o.first_token_index) for o in first] == [("a", 0), ("b", 0)]
    assert engine.migration.request_block_ids("a") == [0, 1]
    assert engine.abort_request("a")
    assert engine.request_status("a") is None
    assert engine.stats().num_used_blocks == 1
    outputs = engine.step()
    assert [
        (o.request_id, o.new_token_ids, o.first_token_index, o.finished, o.finish_reason)
        for o in outputs
    ][0] == (
        "a",
        [],
        1,
        True,
        "abort",
    )
    assert [o.request_id for o in outputs] == ["a", "b"]
    assert all(o.request_id == "b" for o in engine.step())
    engine.abort_request("b")
    engine.step()
    assert not engine.has_unfinished_requests()


def test_stats_and_running_views(make_engine):
    engine = make_engine(
        num_kv_blocks=6, block_size=4, scheduling_policy="priority", max_num_batched_tokens=64
    )
    engine.add_request("hi", [1] * 6, SamplingParams(max_tokens=20, ignore_eos=True), priority=2)
    engine.add_request("lo", [1] * 9, SamplingParams(max_tokens=20, ignore_eos=True))
    engine.add_request("queued", [1] * 13, SamplingParams(max_tokens=20, ignore_eos=True))
    engine.step()
    stats = engine.stats()
    assert (stats.num_running, stats.num_waiting, stats.num_running_high_priority) == (2, 1, 1)
    assert (stats.num_total_blocks, stats.num_used_blocks, stats.num_free_blocks) == (6, 5, 1)
    assert stats.num_hol_blocks == 4  # 13 tokens in blocks of 4
    assert [
        (v.request_id, v.num_tokens, v.num_blocks, v.priority, v.num_output_tokens)
        for v in engine.running_requests()
    ] == [
        ("hi", 7, 2, 2, 1),
        ("lo", 10, 3, 0, 1),
    ]
    reserved = engine.migration.reserve_blocks(1)
    assert engine.stats().num_reserved_blocks == 1
    engine.step()  # hi needs no block (7 -> 8 tokens fit), lo needs none either (10 -> 11 in 3 blocks)
    engine.migration.release_blocks(reserved)
    for request_id in ("hi", "lo", "queued"):
        engine.abort_request(request_id)
    engine.step()


def test_preemption_callback_and_last_step(make_engine):
    engine = make_engine(num_kv_blocks=3, block_size=4)
    preempted = []
    engine.add_preemption_callback(preempted.append)
    engine.add_request("a", [1] * 4, SamplingParams(max_tokens=8, ignore_eos=True))
    engine.add_request("b", [2] * 4, SamplingParams(max_tokens=8, ignore_eos=True))
    tokens = collect(engine.step(), {})  # a and b fill a block each
    assert engine.last_step.started_request_ids == ["a", "b"]  # their prefill began
    collect(
        engine.step(), tokens
    )  # a takes the last free block; b needs one too and preempts itself
    assert preempted == ["b"]
    assert engine.last_step.preempted_request_ids == ["b"]
    assert engine.last_step.started_request_ids == []  # a decodes; b waits again
    assert engine.request_status("b") is RequestStatus.WAITING
    outputs = run_to_completion(engine, tokens)
    assert outputs["a"] == reference(tuple([1] * 4))[:8]
    assert outputs["b"] == reference(tuple([2] * 4))[:8]


def test_prompt_equal_to_the_context_yields_one_token(make_engine):
    engine = make_engine(num_kv_blocks=16, max_model_len=32)
    out = engine.generate([[3] * 32], SamplingParams(max_tokens=5, ignore_eos=True))[0]
    assert (len(out.new_token_ids), out.finish_reason) == (1, "length")


def test_text_round_trip_through_the_byte_tokenizer(make_engine):
    engine = make_engine(num_kv_blocks=16)
    ids = engine.tokenizer.encode("héllo")
    assert ids == [256, 104, 195, 169, 108, 108, 111]
    assert engine.tokenizer.decode(ids + [257]) == "héllo"
    assert engine.eos_token_id == 257
    assert engine.model_config.num_layers == 4 and engine.model_config.vocab_size == 258


def test_bfloat16_engine_halves_weight_and_kv_bytes(make_engine):
    fp32 = make_engine(num_kv_blocks=16)
    bf16 = make_engine(num_kv_blocks=16, dtype="bfloat16")
    assert bf16.weight_nbytes * 2 == fp32.weight_nbytes
    assert bf16.kv_block_nbytes * 2 == fp32.kv_block_nbytes
    out = bf16.generate([PROMPTS[0]], SamplingParams(max_tokens=6, ignore_eos=True))[0]
    assert len(out.new_token_ids) == 6 and all(0 <= t < 258 for t in out.new_token_ids)
