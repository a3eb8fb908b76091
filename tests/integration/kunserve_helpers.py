"""What the KunServe integration tests share: group RPCs, workloads, streaming."""

from __future__ import annotations

import asyncio

from gateway.client import AsyncClient
from protos import scheduler_pb2, scheduler_pb2_grpc
from services.common.grpc_client import cluster_channel

TIMEOUT_S = 180.0
GROUP_RPC_TIMEOUT_S = 120.0


def _scheduler(mesh) -> scheduler_pb2_grpc.SchedulerStub:
    return scheduler_pb2_grpc.SchedulerStub(cluster_channel(mesh.scheduler_address))


def drop(mesh, instance_ids: list[str]) -> scheduler_pb2.DropGroupResponse:
    return _scheduler(mesh).DropGroup(
        scheduler_pb2.DropGroupRequest(instance_ids=instance_ids), timeout=GROUP_RPC_TIMEOUT_S
    )


def restore(mesh, group_id: str) -> scheduler_pb2.RestoreGroupResponse:
    return _scheduler(mesh).RestoreGroup(
        scheduler_pb2.RestoreGroupRequest(group_id=group_id), timeout=GROUP_RPC_TIMEOUT_S
    )


def workload(num: int, offset: int, max_tokens: int) -> list[tuple[list[int], dict]]:
    """Greedy and seeded requests of different lengths (ignore_eos: fixed lengths)."""
    return [
        (
            [(7 * i + 3 * j + offset) % 256 for j in range(5 + 9 * i)],
            {
                "max_tokens": max_tokens + 7 * i,
                "ignore_eos": True,
                "seed": 1000 + offset + i,
                "temperature": 0.0 if i % 2 else 0.8,
            },
        )
        for i in range(num)
    ]


def run_streams(mesh, requests, prefix: str, during) -> list[list[int]]:
    """Stream `requests` through the gateway; once each has a token, run `during()` (a
    blocking function of the scenario, on a thread) while they keep streaming."""

    async def scenario():
        async with AsyncClient(mesh.gateway_address, timeout_s=TIMEOUT_S) as client:
            streams = [
                client.generate_stream(prompt_token_ids=p, request_id=f"{prefix}-{i}", **s)
                for i, (p, s) in enumerate(requests)
            ]
            firsts = await asyncio.gather(*(anext(s) for s in streams))
            chunks = [[f] for f in firsts]

            async def drain(stream, into):
                async for chunk in stream:
                    into.append(chunk)

            draining = asyncio.gather(*(drain(s, c) for s, c in zip(streams, chunks, strict=True)))
            await asyncio.to_thread(during)
            await draining
            return chunks

    received = asyncio.run(scenario())
    tokens = []
    for chunks in received:
        indices = [c.first_token_index for c in chunks]
        # Contiguous: no token repeated or skipped across the moves.
        assert indices == [sum(len(c.token_ids) for c in chunks[:k]) for k in range(len(chunks))]
        assert chunks[-1].finish_reason == "length"
        tokens.append([t for c in chunks for t in c.token_ids])
    return tokens


def trickle(mesh, requests, prefix: str, gap_s: float, stop) -> list[list[int]]:
    """Submit `requests` one every `gap_s` seconds (cycling until `stop` is set, at
    least once through), each streamed to its end; their tokens in submit order."""

    async def scenario():
        async with AsyncClient(mesh.gateway_address, timeout_s=TIMEOUT_S) as client:

            async def one(i: int, prompt, sampling) -> list[int]:
                tokens: list[int] = []
                async for chunk in client.generate_stream(
                    prompt_token_ids=prompt, request_id=f"{prefix}-{i}", **sampling
                ):
                    assert chunk.first_token_index == len(tokens)
                    tokens += chunk.token_ids
                assert chunk.finish_reason == "length"
                return tokens

            tasks, i = [], 0
            while i < len(requests) or not stop.is_set():
                prompt, sampling = requests[i % len(requests)]
                tasks.append(asyncio.ensure_future(one(i, prompt, sampling)))
                i += 1
                await asyncio.sleep(gap_s)
            return await asyncio.gather(*tasks)

    return asyncio.run(scenario())
