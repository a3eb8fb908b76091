"""2 workers + scheduler + gateway: the mesh returns exactly what the local engine does."""

from __future__ import annotations

import asyncio

from gateway.client import AsyncClient, Client
from tests.integration.conftest import log_events, reference_tokens

STREAM_TIMEOUT_S = 60.0


def _workload(num_requests: int) -> list[tuple[list[int], dict]]:
    """Mixed prompts, lengths, greedy and seeded sampling (temperatures exact in float32)."""
    workload = []
    for i in range(num_requests):
        prompt = [(7 * i + 13 * j) % 256 for j in range(5 + i % 11)]
        sampling = {
            "max_tokens": 6 + i % 5,
            "temperature": 0.0 if i % 2 == 0 else 0.75,
            "top_p": 1.0 if i % 4 else 0.875,
            "top_k": 0 if i % 3 else 20,
            "seed": 1000 + i,
            "ignore_eos": i % 5 == 0,
        }
        workload.append((prompt, sampling))
    return workload


async def _stream_all(address: str, workload) -> list[tuple[list[int], set[str], str | None]]:
    async with AsyncClient(address, timeout_s=STREAM_TIMEOUT_S) as client:

        async def one(prompt, sampling):
            tokens: list[int] = []
            instances: set[str] = set()
            finish = None
            async for chunk in client.generate_stream(prompt_token_ids=prompt, **sampling):
                assert chunk.first_token_index == len(tokens)  # contiguous, never repeated
                tokens.extend(chunk.token_ids)
                instances.add(chunk.instance_id)
                finish = chunk.finish_reason
            return tokens, instances, finish

        return await asyncio.gather(*(one(p, s) for p, s in workload))


def test_32_concurrent_streams_match_the_local_engine(mesh, reference_engine):
    workload = _workload(32)
    expected = reference_tokens(reference_engine, workload)

    results = asyncio.run(_stream_all(mesh.gateway_address, workload))

    assert [tokens for tokens, _, _ in results] == expected
    assert all(finish in ("length", "stop") for _, _, finish in results)
    # The scheduler spread the burst over both workers.
    assert set().union(*(instances for _, instances, _ in results)) == {
        w.name for w in mesh.live_workers()
    }


def test_unary_generate_text_prompt_and_detokenize(mesh, reference_engine):
    with Client(mesh.gateway_address, timeout_s=STREAM_TIMEOUT_S) as client:
        result = client.generate("Hello, mesh!", max_tokens=8, seed=5, detokenize=True)
    prompt = reference_engine.tokenizer.encode("Hello, mesh!")
    [expected] = reference_tokens(reference_engine, [(prompt, {"max_tokens": 8, "seed": 5})])
    assert list(result.token_ids) == expected
    assert result.num_prompt_tokens == len(prompt)
    assert result.seed == 5
    assert result.text == reference_engine.tokenizer.decode(expected)


def test_one_trace_per_request_across_gateway_scheduler_worker(mesh):
    with Client(mesh.gateway_address, timeout_s=STREAM_TIMEOUT_S) as client:
        chunks = list(
            client.generate_stream(prompt_token_ids=[1, 2, 3], max_tokens=4, request_id="trace-me")
        )
    instance_id = chunks[0].instance_id
    worker = next(w for w in mesh.workers if w.name == instance_id)

    gateway_events = log_events(mesh.gateway.log_path, "trace-me")
    scheduler_events = log_events(mesh.scheduler.log_path, "trace-me")
    worker_events = log_events(worker.log_path, "trace-me")

    assert {e["event"] for e in gateway_events} >= {
        "request_received",
        "request_placed",
        "request_finished",
    }
    assert {e["event"] for e in scheduler_events} == {"dispatched"}
    assert {e["event"] for e in worker_events} >= {"request_admitted", "request_finished"}
    trace_ids = {e["trace_id"] for e in gateway_events + scheduler_events + worker_events}
    assert len(trace_ids) == 1
