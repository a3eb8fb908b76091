"""The device staging (staging.py) with device "cpu": the same code a GPU runs (chunked
copies through two reused buffers; a step's inputs in one upload), checked byte for
byte here, and the whole engine run through it ("a fake accelerator") against the plain
CPU path: the same tokens, also across a live migration."""

from __future__ import annotations

import pytest
import torch

from services.worker.engine import SamplingParams
from services.worker.engine.staging import KVStaging, StepUploader, device_staging
from tests.unit.worker.engine.helpers import collect, random_prompts, run_to_completion

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.uint8]
SHAPES = [(0,), (1,), (3, 5, 7), (2, 2, 3, 4, 2, 8)]


def _random(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator).to(dtype)
    return torch.randint(0, 250, shape, generator=generator).to(dtype)


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    )


@pytest.mark.parametrize("chunk_bytes", [1, 7, 64, 1000, 1 << 20])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kv_staging_round_trips_byte_exact(dtype, chunk_bytes):
    staging = KVStaging("cpu", chunk_bytes=chunk_bytes)
    for seed, shape in enumerate(SHAPES):
        src = _random(shape, dtype, seed)
        host = torch.full(shape, 3, dtype=dtype)  # overwritten entirely
        assert staging.to_host(src, host) is host
        assert _same_bytes(host, src)
        back = torch.zeros(shape, dtype=dtype)
        assert staging.from_host(host, back) is back
        assert _same_bytes(back, src)
        assert _same_bytes(staging.copy_to_host(src), src)
        assert _same_bytes(staging.copy_to_device(src), src)


def test_kv_staging_reads_a_strided_source_and_refuses_mismatches():
    staging = KVStaging("cpu", chunk_bytes=16)
    src = _random((4, 6), torch.float32, 1).t()  # not contiguous
    out = torch.empty(6, 4)
    assert _same_bytes(staging.to_host(src, out), src.contiguous())
    with pytest.raises(ValueError, match="shapes and dtypes must match"):
        staging.to_host(src, torch.empty(6, 4, dtype=torch.float16))
    with pytest.raises(ValueError, match="contiguous host tensor"):
        staging.to_host(src, torch.empty(4, 6).t())
    with pytest.raises(ValueError, match="chunk_bytes"):
        KVStaging("cpu", chunk_bytes=0)
    assert device_staging("cpu") is device_staging(torch.device("cpu"))


def test_step_uploader_uploads_every_tensor_in_one_buffer_and_reuses_its_host_buffer():
    uploader = StepUploader("cpu")
    sizes = [(3,), (2, 4), (0,), (5, 1)]
    for round_no in range(3):  # the host buffer grows once, then is reused
        host = [torch.arange(n * (round_no + 1)).view(-1) for n in (3, 8, 0, 5)]
        host = [t.view(shape) if round_no == 0 else t for t, shape in zip(host, sizes, strict=True)]
        out = uploader.upload(host)
        assert [tuple(t.shape) for t in out] == [tuple(t.shape) for t in host]
        assert all(torch.equal(a, b) for a, b in zip(out, host, strict=True))
        assert all(t.dtype == torch.int64 for t in out)
    earlier = uploader.upload([torch.tensor([7, 8, 9])])
    uploader.upload([torch.tensor([1, 2, 3])])
    assert earlier[0].tolist() == [7, 8, 9]  # results are not views of the reused host buffer


class CountingUploader(StepUploader):
    def __init__(self, device: str) -> None:
        super().__init__(device)
        self.num_uploads = 0

    def upload(self, tensors):
        self.num_uploads += 1
        return super().upload(tensors)


def _staged(engine, chunk_bytes: int = 4096):
    """The engine's steps and KV copies through the staging path, device "cpu"."""
    engine.executor.uploader = CountingUploader("cpu")
    engine.kv_cache.staging = KVStaging("cpu", chunk_bytes=chunk_bytes)
    return engine


PROMPTS = random_prompts(seed=23, num_prompts=5, min_len=3, max_len=150)
PARAMS = [
    SamplingParams(max_tokens=20, ignore_eos=True),
    SamplingParams(max_tokens=20, temperature=0.8, top_p=0.9, top_k=40, seed=5, ignore_eos=True),
]


def _generate(engine) -> dict[str, list[int]]:
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"r{i}", prompt, PARAMS[i % 2])
    return run_to_completion(engine)


def test_the_engine_through_the_staging_path_gives_the_plain_path_s_tokens(make_engine):
    config = dict(kernels="torch", num_kv_blocks=80, block_size=8, max_num_batched_tokens=64)
    expected = _generate(make_engine(**config))  # prefill chunks, decode groups, sampling
    staged = _staged(make_engine(**config))
    assert _generate(staged) == expected
    assert staged.executor.uploader.num_uploads >= 20  # every step (20 tokens each) went through it


def _read_to_host(engine, block_ids: list[int]) -> torch.Tensor:
    kv = engine.kv_cache
    out = torch.empty(kv.block_shape(len(block_ids)), dtype=kv.layers[0].dtype)
    return engine.migration.read_kv_blocks(block_ids, out=out)


@pytest.mark.parametrize("staged_side", ["source", "destination", "both"])
def test_a_migration_through_staging_continues_exactly(make_engine, staged_side):
    config = dict(kernels="torch", num_kv_blocks=64, block_size=4)
    prompt, params = PROMPTS[1], PARAMS[1]
    alone = make_engine(**config)
    alone.add_request("r", prompt, params)
    expected = run_to_completion(alone)["r"]

    source, destination = make_engine(**config), make_engine(**config)
    if staged_side in ("source", "both"):
        _staged(source, chunk_bytes=1000)  # cuts blocks mid-way
    if staged_side in ("destination", "both"):
        _staged(destination, chunk_bytes=1000)
    destination.add_request("other", PROMPTS[0], PARAMS[0])
    destination.step()
    source.add_request("r", prompt, params)
    tokens: dict[str, list[int]] = {}
    for _ in range(4):
        collect(source.step(), tokens)
    source.migration.suspend_request("r")
    state = source.migration.export_request_state("r")
    blocks = source.migration.request_block_ids("r")
    reserved = destination.migration.reserve_blocks(len(blocks))
    data = _read_to_host(source, blocks)
    destination.migration.write_kv_blocks(reserved, data)
    assert torch.equal(_read_to_host(destination, reserved), data)  # byte for byte
    destination.migration.import_request(state, reserved)
    source.migration.remove_request("r")
    run_to_completion(destination, tokens)
    assert tokens["r"] == expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)")
@pytest.mark.parametrize("chunk_bytes", [1000, 1 << 20])
def test_on_a_gpu_kv_staging_round_trips_through_device_memory(chunk_bytes):
    staging = KVStaging("cuda", chunk_bytes=chunk_bytes)
    for seed, shape in enumerate([(3, 5, 7), (2, 2, 3, 4, 2, 8), (4096, 33)]):
        for dtype in DTYPES:
            src = _random(shape, dtype, seed)
            on_device = staging.copy_to_device(src)
            assert on_device.is_cuda and _same_bytes(on_device.cpu(), src)
            assert _same_bytes(staging.copy_to_host(on_device), src)
            pinned = torch.empty(shape, dtype=dtype).pin_memory()  # the one-copy path
            assert _same_bytes(staging.to_host(on_device, pinned), src)
            assert _same_bytes(staging.from_host(pinned, torch.empty_like(on_device)).cpu(), src)
    uploader = StepUploader("cuda")
    host = [torch.arange(5), torch.arange(12).view(3, 4)]
    out = uploader.upload(host)
    assert all(t.is_cuda and torch.equal(t.cpu(), h) for t, h in zip(out, host, strict=True))
