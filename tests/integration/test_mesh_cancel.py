"""Cancellation: a client that goes away or aborts frees the request's KV blocks."""

from __future__ import annotations

import asyncio

from gateway.client import AsyncClient, Client
from tests.integration.conftest import cluster_state, wait_until, worker_load

TIMEOUT_S = 60.0
LONG = {"max_tokens": 1500, "ignore_eos": True, "seed": 3}


def _instance_load(mesh, instance_id):
    for instance in cluster_state(mesh.scheduler_address).instances:
        if instance.info.instance_id == instance_id:
            return instance.load
    raise AssertionError(f"{instance_id} is not in the cluster state")


def test_client_cancel_mid_stream_frees_the_blocks(mesh):
    with Client(mesh.gateway_address, timeout_s=TIMEOUT_S) as client:
        stream = client.generate_stream(
            prompt_token_ids=list(range(40)), request_id="cancel-me", **LONG
        )
        first = next(stream)
        second = next(stream)
        instance_id = first.instance_id
        # Running and holding blocks, as its load reports say.
        load = wait_until(
            lambda: (ld := _instance_load(mesh, instance_id)).num_used_blocks > 0 and ld,
            what="the request to show in the load report",
        )
        assert [r.request_id for r in load.running] == ["cancel-me"]
        assert second.first_token_index == len(first.token_ids)
        stream.close()  # cancels the call

    load = wait_until(
        lambda: (
            (ld := _instance_load(mesh, instance_id)).num_running == 0
            and ld.num_used_blocks == 0
            and ld
        ),
        what="the worker to free the cancelled request's blocks",
    )
    assert list(load.running) == []
    worker = next(w for w in mesh.workers if w.name == instance_id)
    assert worker_load(worker.address, check_integrity=True).integrity_error == ""


def test_abort_from_another_connection_ends_the_stream(mesh):
    async def scenario():
        async with (
            AsyncClient(mesh.gateway_address, timeout_s=TIMEOUT_S) as streamer,
            AsyncClient(mesh.gateway_address) as admin,
        ):
            chunks = []
            stream = streamer.generate_stream(
                prompt_token_ids=[5, 6, 7], request_id="abort-me", **LONG
            )
            chunks.append(await anext(stream))
            assert await admin.abort("abort-me") is True
            async for chunk in stream:
                chunks.append(chunk)
            return chunks

    chunks = asyncio.run(scenario())
    assert chunks[-1].finish_reason == "abort"
    indices = [c.first_token_index for c in chunks]
    assert indices == sorted(indices)
    assert sum(len(c.token_ids) for c in chunks) < LONG["max_tokens"]
