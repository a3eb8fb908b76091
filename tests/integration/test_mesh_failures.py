"""Process deaths: a worker killed mid-generation, the scheduler killed and restarted."""

from __future__ import annotations

import asyncio

from gateway.client import AsyncClient, Client
from tests.integration.conftest import (
    NUM_WORKERS,
    cluster_state,
    log_events,
    reference_tokens,
    wait_until,
)

TIMEOUT_S = 120.0


def test_kill_9_worker_mid_generation_resumes_on_the_other(mesh, reference_engine):
    workload = [
        ([(11 * i + j) % 256 for j in range(6 + i)], {"max_tokens": 300, "ignore_eos": True, "seed": 70 + i,
                                                      "temperature": 0.0 if i % 2 else 0.75})
        for i in range(6)
    ]  # fmt: skip
    expected = reference_tokens(reference_engine, workload)

    async def scenario():
        async with AsyncClient(mesh.gateway_address, timeout_s=TIMEOUT_S) as client:
            streams = [
                client.generate_stream(prompt_token_ids=p, request_id=f"failover-{i}", **s)
                for i, (p, s) in enumerate(workload)
            ]
            # All start at once; each has produced a token somewhere, none is near its end.
            firsts = await asyncio.gather(*(anext(stream) for stream in streams))
            received: list[list] = [[first] for first in firsts]
            by_instance = {}
            for i, chunks in enumerate(received):
                by_instance.setdefault(chunks[0].instance_id, []).append(i)
            victim_id = max(by_instance, key=lambda k: len(by_instance[k]))
            victim = next(w for w in mesh.workers if w.name == victim_id)
            victim.kill()  # SIGKILL: no cleanup, no goodbye

            async def drain(stream, chunks):
                async for chunk in stream:
                    chunks.append(chunk)

            await asyncio.gather(*(drain(s, c) for s, c in zip(streams, received, strict=True)))
            return victim_id, by_instance[victim_id], received

    victim_id, affected, received = asyncio.run(scenario())

    tokens = []
    for chunks in received:
        indices = [c.first_token_index for c in chunks]
        flat = [t for c in chunks for t in c.token_ids]
        # No duplicated or missing token: each chunk starts where the previous ended.
        assert indices == [sum(len(c.token_ids) for c in chunks[:k]) for k in range(len(chunks))]
        assert chunks[-1].finish_reason == "length"
        tokens.append(flat)
    assert tokens == expected
    survivor = {w.name for w in mesh.workers if w.is_alive()}
    for i in affected:
        assert received[i][0].instance_id == victim_id
        assert received[i][-1].instance_id in survivor
    failovers = [e for e in log_events(mesh.gateway.log_path) if e["event"] == "request_failover"]
    assert {e["request_id"] for e in failovers} == {f"failover-{i}" for i in affected}

    # The scheduler's lease drops the dead instance; a fresh worker restores the mesh.
    wait_until(
        lambda: (
            victim_id
            not in {i.info.instance_id for i in cluster_state(mesh.scheduler_address).instances}
        ),
        what="the dead worker's lease to expire",
    )
    mesh.add_worker()
    wait_until(
        lambda: len(cluster_state(mesh.scheduler_address).instances) == NUM_WORKERS,
        what="re-registration",
    )


def test_kill_scheduler_then_fallback_dispatch_then_relearn(mesh, reference_engine):
    port = int(mesh.scheduler_address.rsplit(":", 1)[1])
    mesh.scheduler.kill()
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6], [5, 3, 5, 8, 9, 7]]
    expected = reference_tokens(
        reference_engine, [(p, {"max_tokens": 5, "seed": 1}) for p in prompts]
    )

    with Client(mesh.gateway_address, timeout_s=TIMEOUT_S) as client:
        results = [
            client.generate(
                prompt_token_ids=p, max_tokens=5, seed=1, request_id=f"no-scheduler-{i}"
            )
            for i, p in enumerate(prompts)
        ]
    assert [list(r.token_ids) for r in results] == expected
    placed = [e for e in log_events(mesh.gateway.log_path) if e["event"] == "request_placed"]
    sources = {
        e["request_id"]: e["source"] for e in placed if e["request_id"].startswith("no-scheduler-")
    }
    assert set(sources.values()) <= {"cached_view", "round_robin"} and len(sources) == 3

    mesh.start_scheduler(port)  # same address: workers and gateway reconnect on their own
    wait_until(
        lambda: len(cluster_state(mesh.scheduler_address).instances) == NUM_WORKERS,
        what="the restarted scheduler to re-learn the instances",
    )
    wait_until(
        lambda: _gateway_sees_scheduler(mesh),
        what="the gateway to use the scheduler again",
    )
    with Client(mesh.gateway_address, timeout_s=TIMEOUT_S) as client:
        result = client.generate(
            prompt_token_ids=prompts[0], max_tokens=5, seed=1, request_id="scheduler-back"
        )
    assert list(result.token_ids) == expected[0]
    [event] = [
        e
        for e in log_events(mesh.gateway.log_path, "scheduler-back")
        if e["event"] == "request_placed"
    ]
    assert event["source"] == "scheduler"


def _gateway_sees_scheduler(mesh) -> bool:
    return any(e["event"] == "scheduler_reachable_again" for e in log_events(mesh.gateway.log_path))
