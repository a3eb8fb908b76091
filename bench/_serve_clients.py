"""The closed-loop clients of `llmesh bench serve`: gRPC streams and OpenAI SSE streams.

Both send the same requests (prompt token ids, greedy, no EOS stop) and time each one
the way `vllm bench serve` does:

    TTFT  time to first token: send -> first chunk carrying a token
    TPOT  time per output token after the first: (latency - TTFT) / (tokens - 1)

The HTTP client (bench/_sse_client.py) reads the SSE stream straight off a keep-alive
connection per stream, one JSON parse per event (cheap on the client, like vLLM's
aiohttp client), and asks for `return_token_ids` so its tokens can be compared. Both
connect before the clock starts: the gRPC client's one channel, the HTTP connections.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from bench._sse_client import SSEConnection


@dataclass(frozen=True)
class RequestTiming:
    ttft_s: float
    latency_s: float
    num_tokens: int

    @property
    def tpot_s(self) -> float | None:
        if self.num_tokens < 2:
            return None
        return (self.latency_s - self.ttft_s) / (self.num_tokens - 1)


@dataclass
class ClientRun:
    elapsed_s: float
    tokens: list[list[int]]
    timings: list[RequestTiming]


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def latency_summary(prefix: str, timings: list[RequestTiming]) -> dict[str, float]:
    """{prefix}_{mean,median,p99}_{ttft,tpot}_ms, as `vllm bench serve` reports them."""
    out = {}
    series = {
        "ttft": [t.ttft_s for t in timings],
        "tpot": [t.tpot_s for t in timings if t.tpot_s is not None],
    }
    for name, values in series.items():
        ms = [v * 1000 for v in values]
        out[f"{prefix}_mean_{name}_ms"] = round(statistics.fmean(ms), 2) if ms else float("nan")
        out[f"{prefix}_median_{name}_ms"] = round(percentile(ms, 50), 2)
        out[f"{prefix}_p99_{name}_ms"] = round(percentile(ms, 99), 2)
    return out


async def _closed_loop(
    num_requests: int, concurrency: int, one: Callable[[int], Awaitable[tuple[list[int], float]]]
) -> ClientRun:
    """Run requests 0..n-1, `concurrency` at a time; `one(i)` returns (tokens, ttft_s)."""
    tokens: list[list[int]] = [[] for _ in range(num_requests)]
    timings: list[RequestTiming] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(num_requests):
        queue.put_nowait(i)

    async def worker() -> None:
        while not queue.empty():
            i = queue.get_nowait()
            sent = time.perf_counter()
            tokens[i], ttft_s = await one(i)
            timings.append(RequestTiming(ttft_s, time.perf_counter() - sent, len(tokens[i])))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, num_requests))))
    return ClientRun(time.perf_counter() - start, tokens, timings)


async def grpc_clients(address: str, args, prompts: list[list[int]]) -> ClientRun:
    from gateway.client import AsyncClient

    async with AsyncClient(address, timeout_s=600) as client:
        await client.generate(
            prompt_token_ids=prompts[0], max_tokens=args.max_tokens, ignore_eos=True
        )

        async def one(i: int) -> tuple[list[int], float]:
            sent = time.perf_counter()
            ttft_s = None
            tokens: list[int] = []
            async for chunk in client.generate_stream(
                prompt_token_ids=prompts[i], max_tokens=args.max_tokens, ignore_eos=True
            ):
                if ttft_s is None and chunk.token_ids:
                    ttft_s = time.perf_counter() - sent
                tokens.extend(chunk.token_ids)
            return tokens, ttft_s or 0.0

        return await _closed_loop(len(prompts), args.concurrency, one)


async def http_clients(http_address: str, args, prompts: list[list[int]]) -> ClientRun:
    num_streams = min(args.concurrency, len(prompts))
    # Connected before the clock starts, as the gRPC client's one channel is.
    pool: asyncio.Queue[SSEConnection] = asyncio.Queue()
    for _ in range(num_streams):
        pool.put_nowait(await SSEConnection.open(http_address))

    async def one(i: int) -> tuple[list[int], float]:
        body = {
            "model": args.model,
            "prompt": prompts[i],
            "max_tokens": args.max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "return_token_ids": True,
        }
        connection = await pool.get()
        sent = time.perf_counter()
        ttft_s = None
        tokens: list[int] = []
        async for event in connection.post_events("/v1/completions", body):
            new = event["choices"][0]["token_ids"]
            if ttft_s is None and new:
                ttft_s = time.perf_counter() - sent
            tokens.extend(new)
        pool.put_nowait(connection)
        return tokens, ttft_s or 0.0

    try:
        await one(0)  # warm-up: the first request
        return await _closed_loop(len(prompts), args.concurrency, one)
    finally:
        while not pool.empty():
            await pool.get_nowait().close()
