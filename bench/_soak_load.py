"""The soak's load: a few fixed requests, their undisturbed tokens, a closed-loop capacity
probe, and an open-loop (Poisson) arrival process that records every request's fate.

Every request is one of `NUM_TEMPLATES` fixed ones (greedy, fixed length, no EOS stop),
so whatever the load, an admitted request must produce exactly the tokens it produced
alone. A request's outcome is one of:

    completed   its last chunk arrived (tokens compared with the undisturbed run)
    shed        refused before its first chunk with a documented status (RESOURCE_EXHAUSTED)
    lost        anything else: another status, a stream cut after it started, no answer
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc

from bench._serve_clients import percentile
from gateway.client import AsyncClient, GatewayError
from protos import worker_pb2, worker_pb2_grpc
from services.common.grpc_client import aio_channel

NUM_TEMPLATES = 8
SHED_CODES = frozenset({"RESOURCE_EXHAUSTED"})  # the documented refusal of admission control


@dataclass(frozen=True)
class Template:
    prompt_token_ids: tuple[int, ...]
    max_tokens: int

    def kwargs(self) -> dict:
        return {
            "prompt_token_ids": list(self.prompt_token_ids),
            "max_tokens": self.max_tokens,
            "temperature": 0.0,
            "ignore_eos": True,
            "seed": 0,
        }


def templates(prompt_len: int, max_tokens: int, seed: int = 0) -> list[Template]:
    rng = random.Random(seed)
    return [
        Template(tuple(rng.randrange(1, 250) for _ in range(prompt_len)), max_tokens)
        for _ in range(NUM_TEMPLATES)
    ]


async def stream_tokens(client: AsyncClient, template: Template) -> tuple[list[int], float]:
    """The tokens of one request and its time to first token."""
    started = time.monotonic()
    ttft_s = -1.0
    tokens: list[int] = []
    async for chunk in client.generate_stream(**template.kwargs()):
        if chunk.token_ids and ttft_s < 0:
            ttft_s = time.monotonic() - started
        tokens.extend(chunk.token_ids)
    return tokens, ttft_s


async def reference_tokens(address: str, requests: list[Template]) -> list[list[int]]:
    """Each template alone on the idle mesh (also warms it up)."""
    async with AsyncClient(address, timeout_s=120) as client:
        return [(await stream_tokens(client, t))[0] for t in requests]


async def measure_capacity(
    address: str, requests: list[Template], concurrency: int, duration_s: float
) -> float:
    """Completed requests per second of a closed loop of `concurrency` streams (enough to
    keep every running batch and waiting queue full: a refused stream tries again after
    20 ms); the soak offers a multiple of it."""
    deadline = time.monotonic() + duration_s
    num_done = 0

    async def loop(client: AsyncClient, index: int) -> None:
        nonlocal num_done
        while time.monotonic() < deadline:
            try:
                await stream_tokens(client, requests[index % len(requests)])
                num_done += 1
            except GatewayError:
                await asyncio.sleep(0.02)  # refused: the queues are full anyway
            index += 1

    started = time.monotonic()
    async with AsyncClient(address, timeout_s=120, retry=None) as client:
        await asyncio.gather(*(loop(client, i) for i in range(concurrency)))
    return num_done / (time.monotonic() - started)


@dataclass
class SoakTally:
    """What happened to every request of an open-loop phase."""

    num_offered: int = 0
    num_completed: int = 0
    num_mismatched: int = 0  # completed with other tokens than the undisturbed run
    shed_codes: Counter = field(default_factory=Counter)
    lost: Counter = field(default_factory=Counter)  # why, for each lost request
    num_cancelled: int = 0  # unanswered when an unbounded phase was cut off (drain=False)
    ttfts_s: list[float] = field(default_factory=list)
    max_waiting_seen: dict[str, int] = field(default_factory=dict)

    @property
    def num_shed(self) -> int:
        return sum(self.shed_codes.values())

    @property
    def num_lost(self) -> int:
        return sum(self.lost.values())

    def p99_ttft_s(self) -> float:
        return percentile(self.ttfts_s, 99) if self.ttfts_s else float("nan")


async def _one_request(client, template, expected, tally: SoakTally) -> None:
    started = time.monotonic()
    ttft_s = -1.0
    tokens: list[int] = []
    try:
        async for chunk in client.generate_stream(**template.kwargs()):
            if chunk.token_ids and ttft_s < 0:
                ttft_s = time.monotonic() - started
            tokens.extend(chunk.token_ids)
    except GatewayError as exc:
        if not tokens and exc.code.name in SHED_CODES:
            tally.shed_codes[exc.code.name] += 1
        else:
            tally.lost[f"{exc.code.name} after {len(tokens)} tokens: {exc.details[:80]}"] += 1
        return
    tally.num_completed += 1
    tally.ttfts_s.append(ttft_s)
    if tokens != expected:
        tally.num_mismatched += 1


async def _watch_queues(addresses: dict[str, str], tally: SoakTally, stop: asyncio.Event):
    """The longest waiting queue each worker reported (GetLoad every 0.25 s)."""
    channels = {name: aio_channel(a) for name, a in addresses.items()}
    try:
        while not stop.is_set():
            for name, channel in channels.items():
                try:
                    load = await worker_pb2_grpc.WorkerStub(channel).GetLoad(
                        worker_pb2.GetLoadRequest(), timeout=2.0
                    )
                except grpc.aio.AioRpcError:
                    continue
                seen = tally.max_waiting_seen.get(name, 0)
                tally.max_waiting_seen[name] = max(seen, load.num_waiting)
            await asyncio.sleep(0.25)
    finally:
        for channel in channels.values():
            await channel.close()


async def open_loop(
    address: str,
    worker_addresses: dict[str, str],
    requests: list[Template],
    expected: list[list[int]],
    rate_rps: float,
    duration_s: float,
    *,
    seed: int = 1,
    drain: bool = True,
) -> tuple[SoakTally, float]:
    """Poisson arrivals at `rate_rps` for `duration_s`, no client retries (the shed are
    counted, not re-sent). drain=False cancels what is still running at the end (an
    unbounded baseline's queue). Returns the tally and the phase's wall time."""
    tally = SoakTally()
    rng = random.Random(seed)
    stop = asyncio.Event()
    watcher = asyncio.create_task(_watch_queues(worker_addresses, tally, stop))
    tasks: set[asyncio.Task] = set()
    started = time.monotonic()
    async with AsyncClient(address, timeout_s=600, retry=None) as client:
        next_at = started
        while next_at < started + duration_s:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            index = rng.randrange(len(requests))
            tally.num_offered += 1
            task = asyncio.create_task(
                _one_request(client, requests[index], expected[index], tally)
            )
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            next_at += rng.expovariate(rate_rps)
        if not drain:
            for task in list(tasks):
                task.cancel()
        await asyncio.gather(*list(tasks), return_exceptions=True)
    # Cut off (drain=False) before an answer: neither completed, shed nor lost.
    tally.num_cancelled = tally.num_offered - tally.num_completed - tally.num_shed - tally.num_lost
    elapsed_s = time.monotonic() - started
    stop.set()
    await watcher
    return tally, elapsed_s
