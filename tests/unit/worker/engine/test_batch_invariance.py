"""Batch invariance: a request's tokens are bit-for-bit the same whatever ran beside it.

Long generations are where this shows: a last-bit difference in one logit (attention
over a padded key length, a matmul over 1 row instead of 40, a prompt cut at another
chunk boundary) flips a sampled token a few hundred tokens in. Each run below changes
only how the same requests are batched; all must give the same tokens, and the same
logits bit for bit at every position (which catches a difference long before it
happens to flip a token).
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from services.worker.engine import EngineConfig, LLMEngine, SamplingParams
from services.worker.engine import executor as executor_module
from services.worker.engine.model import (
    MIN_GEMM_ROWS,
    LlamaModel,
    apply_rope,
    linear,
    rms_norm,
    rope_inv_freq,
    silu,
)
from services.worker.engine.sampler import sample
from services.worker.engine.tiny import TINY_MODEL_CONFIG
from tests.unit.worker.engine.helpers import (
    collect,
    migrate,
    run_to_completion,
    skip_without_native_kernels,
)

# 12 requests, 24..35-token prompts, 300..410 new tokens; odd ones greedy, even ones sampled.
WORKLOAD = [
    (
        [(7 * i + 3 * j) % 256 for j in range(24 + i)],
        SamplingParams(
            max_tokens=300 + 10 * i,
            temperature=0.0 if i % 2 else 0.8,
            seed=500 + i,
            ignore_eos=True,
        ),
    )
    for i in range(12)
]


def run_together(engine, request_ids=range(len(WORKLOAD))) -> dict[str, list[int]]:
    for i in request_ids:
        prompt, params = WORKLOAD[i]
        engine.add_request(f"r{i}", prompt, params)
    return run_to_completion(engine)


class LogitsRecorder:
    """Wraps the executor's sampler: keeps every sampled row's logits, keyed by the
    request's seed (unique in WORKLOAD) and the position being sampled."""

    def __init__(self) -> None:
        self.logits: dict[tuple[int, int], torch.Tensor] = {}
        self._sample = executor_module.sample

    def __call__(self, logits, params, positions):
        for row, p, position in zip(logits, params, positions, strict=True):
            key = (p.seed, position)
            assert key not in self.logits or torch.equal(self.logits[key], row), key
            self.logits[key] = row.clone()
        return self._sample(logits, params, positions)


@pytest.fixture
def recorder(monkeypatch) -> LogitsRecorder:
    recorder = LogitsRecorder()
    monkeypatch.setattr(executor_module, "sample", recorder)
    return recorder


def assert_same_logits(got: LogitsRecorder, expected: LogitsRecorder) -> None:
    differing = [
        key for key, row in got.logits.items() if not torch.equal(row, expected.logits[key])
    ]
    assert not differing, f"{len(differing)} rows differ, first (seed, position): {min(differing)}"


# ---- the environment the torch kernels rely on ------------------------------------

# The row counts a step's matmuls can have (MIN_GEMM_ROWS up to a 512-token budget and
# more), and the tiny model's (in, out) matmul shapes: qkv, o, gate_up, down, lm_head.
GEMM_ROW_COUNTS = (16, 17, 31, 64, 100, 257, 512, 1024, 2048)
TINY_LINEAR_SHAPES = [(256, 384), (256, 256), (256, 1536), (768, 256), (256, 258)]


def gemm_row_dependence(
    weight: torch.Tensor, bias: torch.Tensor | None, others: torch.Tensor, target: torch.Tensor
) -> tuple[int, int] | None:
    """The first (rows, index) at which F.linear gives `target`'s row other bits than in
    a batch of MIN_GEMM_ROWS rows, placed first, middle or last among `others`; None if
    it never does. A property of the machine's BLAS, which model.linear relies on."""
    reference = F.linear(torch.cat([target[None], others[: MIN_GEMM_ROWS - 1]]), weight, bias)[0]
    for num_rows in GEMM_ROW_COUNTS:
        if num_rows > others.shape[0]:
            break
        for index in (0, num_rows // 2, num_rows - 1):
            batch = others[:num_rows].clone()
            batch[index] = target
            if not torch.equal(F.linear(batch, weight, bias)[index], reference):
                return num_rows, index
    return None


def skip_unless_blas_rows_are_invariant(where: str | None) -> None:
    if where is not None:
        pytest.skip(
            f"this machine's BLAS gives an F.linear row other bits in another batch from "
            f"{MIN_GEMM_ROWS} rows on ({where}): the torch kernels cannot be batch-invariant "
            "here (an environment limit, not an llmesh bug; the native kernels are)"
        )


@functools.cache
def tiny_model_gemm_dependence(dtype: torch.dtype, num_threads: int) -> str | None:
    """Where the BLAS property model.linear relies on fails for the tiny model's matmuls
    at this dtype and thread count, or None where it holds."""
    del num_threads  # the cache key: BLAS paths depend on it
    generator = torch.Generator().manual_seed(17)
    for in_features, out_features in TINY_LINEAR_SHAPES:
        weight = torch.randn(out_features, in_features, generator=generator).to(dtype)
        others = torch.randn(512, in_features, generator=generator).to(dtype)
        target = torch.randn(in_features, generator=generator).to(dtype)
        found = gemm_row_dependence(weight, None, others, target)
        if found is not None:
            return f"{dtype}, {in_features} -> {out_features}, (rows, index) {found}"
    return None


@pytest.fixture(scope="module", params=["native", "torch"])
def kernels(request) -> str:
    """The tests comparing against `together` run once per kind of kernels, where that
    kind can be batch-invariant on this machine."""
    if request.param == "native":
        skip_without_native_kernels()
    else:
        skip_unless_blas_rows_are_invariant(
            tiny_model_gemm_dependence(torch.float32, torch.get_num_threads())
        )
    return request.param


@pytest.fixture(scope="module")
def together(kernels) -> tuple[dict[str, list[int]], LogitsRecorder]:
    """The reference: all 12 admitted at once into a roomy engine (module-scoped, so
    built without the make_engine fixture)."""
    recorder = LogitsRecorder()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(executor_module, "sample", recorder)
        engine = LLMEngine.from_config(
            EngineConfig(
                num_kv_blocks=512,
                memory_capacity_bytes=32 << 20,
                kernels=kernels,
            )
        )
        tokens = run_together(engine)
    engine.check_integrity()
    assert len(recorder.logits) == sum(p.max_tokens for _, p in WORKLOAD)
    return tokens, recorder


def test_alone_equals_together(make_engine, together, recorder, kernels):
    # Two of the twelve (all alone would take half a minute): one sampled, one greedy.
    tokens, logits = together
    for i in (2, 11):
        engine = make_engine(kernels=kernels, num_kv_blocks=64)
        assert run_together(engine, [i]) == {f"r{i}": tokens[f"r{i}"]}, f"request {i}"
    assert_same_logits(recorder, logits)


def test_preempted_and_recomputed_equals_together(make_engine, together, recorder, kernels):
    # 45 blocks of 16 hold two of these six at full length: constant preemption, and
    # recomputation runs generated tokens through prefill. (Any subset of the twelve
    # must give the same logits as all of them.)
    engine = make_engine(kernels=kernels, num_kv_blocks=45)
    tokens = run_together(engine, range(6))
    assert tokens == {f"r{i}": together[0][f"r{i}"] for i in range(6)}
    assert engine.stats().num_preemptions >= 5
    assert_same_logits(recorder, together[1])


def test_chunked_prefill_with_a_small_budget_equals_together(
    make_engine, together, recorder, kernels
):
    # 20 tokens a step and blocks of 8: prompts are cut at other places, next to decodes.
    engine = make_engine(
        kernels=kernels,
        num_kv_blocks=512,
        max_num_batched_tokens=20,
        block_size=8,
    )
    tokens = run_together(engine, range(6, 12))
    assert tokens == {f"r{i}": together[0][f"r{i}"] for i in range(6, 12)}
    assert_same_logits(recorder, together[1])


def test_staggered_arrivals_and_migration_equal_together(make_engine, together, recorder, kernels):
    """Requests arrive over time; two of them move mid-generation (KV copied, not
    recomputed) to an engine running others."""
    source = make_engine(kernels=kernels, num_kv_blocks=512)
    destination = make_engine(kernels=kernels, num_kv_blocks=512)
    tokens: dict[str, list[int]] = {}
    for i in range(5, 8):
        destination.add_request(f"r{i}", *WORKLOAD[i])
    for i in range(5):
        source.add_request(f"r{i}", *WORKLOAD[i])
        for _ in range(7 * i + 1):
            collect(source.step(), tokens)
            collect(destination.step(), tokens)
    for request_id in ("r1", "r4"):
        migrate(source, destination, request_id, tokens)
    while source.has_unfinished_requests() or destination.has_unfinished_requests():
        collect(source.step(), tokens)
        collect(destination.step(), tokens)
    assert tokens == {f"r{i}": together[0][f"r{i}"] for i in range(8)}
    assert_same_logits(recorder, together[1])


def test_bfloat16_alone_equals_together(make_engine, recorder):
    skip_unless_blas_rows_are_invariant(
        tiny_model_gemm_dependence(torch.bfloat16, torch.get_num_threads())
    )
    params = [
        SamplingParams(max_tokens=40, temperature=0.8, seed=900 + i, ignore_eos=True)
        for i in range(4)
    ]
    prompts = [WORKLOAD[i][0] for i in range(4)]
    engine = make_engine(num_kv_blocks=64, dtype="bfloat16")
    for i in range(4):
        engine.add_request(f"b{i}", prompts[i], params[i])
    together = run_to_completion(engine)
    together_logits = dict(recorder.logits)
    recorder.logits.clear()
    for i in range(4):
        engine = make_engine(num_kv_blocks=64, dtype="bfloat16")
        engine.add_request(f"b{i}", prompts[i], params[i])
        assert run_to_completion(engine) == {f"b{i}": together[f"b{i}"]}
    assert recorder.logits.keys() == together_logits.keys()
    differing = [
        k for k, row in recorder.logits.items() if not torch.equal(row, together_logits[k])
    ]
    assert not differing


# ---- the building blocks, on random tensors ---------------------------------------


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    previous = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(previous)


ROW_COUNTS = (1, 2, 5, 15, 16, 17, 40, 64, 129, 512)


def rows_everywhere(target: torch.Tensor, others: torch.Tensor):
    """Yields (batch, index): target placed first, middle and last among num_rows rows."""
    for num_rows in ROW_COUNTS:
        for index in sorted({0, num_rows // 2, num_rows - 1}):
            batch = others[:num_rows].clone()
            batch[index] = target
            yield batch, index


def assert_row_invariant(fn, width: int, dtype=torch.float32) -> None:
    generator = torch.Generator().manual_seed(width)
    others = torch.randn(max(ROW_COUNTS), width, generator=generator).to(dtype)
    target = torch.randn(width, generator=generator).to(dtype)
    alone = fn(target[None])[0]
    for batch, index in rows_everywhere(target, others):
        assert torch.equal(fn(batch)[index], alone), (len(batch), index)


# (in, out, bias): the tiny model's qkv, o, gate_up, down and lm_head; HF test shapes.
LINEAR_SHAPES = [
    (256, 384, False),
    (256, 256, False),
    (256, 1536, False),
    (768, 256, False),
    (64, 320, True),
    (128, 64, True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("in_features,out_features,has_bias", LINEAR_SHAPES)
def test_linear_rows_are_invariant_given_the_blas_property(
    threads, in_features, out_features, has_bias, dtype
):
    """model.linear pads batches of fewer than MIN_GEMM_ROWS rows, relying on a measured
    property of MKL on the machines the project runs on: from MIN_GEMM_ROWS rows on,
    F.linear's row results do not depend on the row count or the row's place. That is
    checked first, as an environment check: where this machine's BLAS lacks it, the test
    skips saying so (the torch kernels cannot be batch-invariant there)."""
    generator = torch.Generator().manual_seed(in_features + out_features)
    weight = torch.randn(out_features, in_features, generator=generator) / in_features**0.5
    bias = torch.randn(out_features, generator=generator) if has_bias else None
    others = torch.randn(2048, in_features, generator=generator)
    target = torch.randn(in_features, generator=generator)
    weight, others, target = weight.to(dtype), others.to(dtype), target.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    found = gemm_row_dependence(weight, bias, others, target)
    skip_unless_blas_rows_are_invariant(
        None
        if found is None
        else f"{dtype}, {in_features} -> {out_features}, (rows, index) {found}"
    )
    assert_row_invariant(lambda x: linear(x, weight, bias), in_features, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_rows_are_invariant(threads, dtype):
    weight = (1 + 0.1 * torch.randn(256, generator=torch.Generator().manual_seed(1))).to(dtype)
    assert_row_invariant(lambda x: rms_norm(x, weight, 1e-5), 256, dtype)


def test_silu_and_swiglu_rows_are_invariant(threads):
    def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)  # strided views, as in the layer
        return silu(gate).mul_(up)

    assert_row_invariant(swiglu, 2 * 768)
    assert_row_invariant(swiglu, 2 * 100)  # a width that is not a multiple of the vector


def test_rope_rows_are_invariant(threads):
    model = TinyRope()
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(600, 10, 32, generator=generator)
    positions = torch.randint(0, 2048, (600,), generator=generator)
    cos, sin = model.rope_cos_sin(positions[:1])
    alone = apply_rope(x[:1], cos, sin)[0]
    for num_rows in ROW_COUNTS:
        for index in sorted({0, num_rows // 2, num_rows - 1}):
            batch_x, batch_positions = (
                x[1 : num_rows + 1].clone(),
                positions[1 : num_rows + 1].clone(),
            )
            batch_x[index], batch_positions[index] = x[0], positions[0]
            cos, sin = model.rope_cos_sin(batch_positions)
            assert torch.equal(apply_rope(batch_x, cos, sin)[index], alone), (num_rows, index)


class TinyRope:
    """The tiny model's RoPE tables, without building its weights."""

    def __init__(self) -> None:
        self.inv_freq = rope_inv_freq(TINY_MODEL_CONFIG)
        self.dtype = torch.float32

    rope_cos_sin = LlamaModel.rope_cos_sin


def test_sampler_rows_are_invariant(threads):
    """The sampler's reductions (softmax over the vocab, its cumulative sum) are per row,
    and a row's token does not depend on the other rows."""
    generator = torch.Generator().manual_seed(4)
    assert_row_invariant(lambda x: torch.softmax(x / 0.8, dim=-1), 256)
    assert_row_invariant(lambda x: torch.softmax(x, dim=-1), 32000)
    assert_row_invariant(lambda x: torch.cumsum(torch.softmax(x, dim=-1), dim=-1), 256)
    logits = 3 * torch.randn(64, 256, generator=generator)
    params = [SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=i) for i in range(64)]
    together = sample(logits, params, list(range(64)))
    alone = [sample(logits[i : i + 1], params[i : i + 1], [i])[0] for i in range(64)]
    assert together == alone
