"""Transports in two processes (the child is spawned and killed by PID by the fixtures)."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from kvtransport import (
    Backend,
    PeerUnreachable,
    TrafficClass,
    TransferTimeout,
    TransportConfig,
    make_transport,
)
from kvtransport.config import MIB
from tests.unit.kvtransport.conftest import BACKENDS
from tests.unit.kvtransport.helpers import assert_clean, cached_pattern, wait_until
from tests.unit.kvtransport.peer_process import PeerProcess, digest, payload

SIZES = [0, 1, 4095, 65537, 3 * MIB + 7, 64 * MIB]
FAILURE_TIMEOUT_S = 1.5
# How late past its timeout a failure may be reported (scheduling on a loaded CI box).
REPORT_SLACK_S = 3.0


@pytest.fixture(scope="module", params=BACKENDS, ids=[b.value for b in BACKENDS])
def shared_child(request):
    """One child per backend for the tests that leave it healthy."""
    child = PeerProcess(backend=request.param.value, kv_chunk_bytes=MIB)
    try:
        yield request.param, child
    finally:
        child.stop()


@pytest.fixture
async def make_local():
    transports = []

    async def make(backend: Backend, **config_kwargs):
        transport = make_transport(TransportConfig(backend=backend, **config_kwargs))
        transports.append(transport)
        await transport.start()
        return transport

    yield make
    for transport in transports:
        await transport.close()


async def test_every_size_arrives_byte_exact_in_the_other_process(shared_child, make_local):
    backend, child = shared_child
    local = await make_local(backend, kv_chunk_bytes=MIB)
    for index, nbytes in enumerate(SIZES):
        transfer_id = f"size-{nbytes}"
        receiving = child.request("recv", transfer_id, 30.0)
        data = payload(index, nbytes)
        handle = await local.send(child.address, transfer_id, data)
        status, result = await child.reply(receiving)
        assert (status, result["digests"]) == ("ok", [digest(data)]), transfer_id
        await handle.wait()
    await assert_clean(local)


async def test_child_sends_many_concurrent_transfers_to_the_parent(shared_child, make_local):
    backend, child = shared_child
    local = await make_local(backend)
    specs = {f"from-child-{i}": [(100 + i, 70_000 * i + 1), (200 + i, 3 * i)] for i in range(12)}
    receives = {tid: asyncio.create_task(local.recv(tid, timeout=30)) for tid in specs}
    sends = [
        child.request("send", local.address, tid, seeds_and_sizes, "kv", None)
        for tid, seeds_and_sizes in specs.items()
    ]
    for op_id in sends:
        assert await child.reply(op_id) == ("ok", "done")
    for tid, seeds_and_sizes in specs.items():
        received = await receives[tid]
        expected = [payload(seed, nbytes) for seed, nbytes in seeds_and_sizes]
        assert all(torch.equal(r, e) for r, e in zip(received, expected, strict=True)), tid
    await assert_clean(local)


async def test_activation_arrives_first_while_256mib_of_kv_flows(shared_child, make_local):
    backend, child = shared_child
    if backend is Backend.TCP:
        pytest.skip("priority over TCP is covered in test_loopback; UCX is what ships")
    local = await make_local(backend)
    kv, activation = cached_pattern(256 * MIB), payload(2, 64 * 1024)
    kv_op = child.request("recv", "prio-kv", 60.0)
    activation_op = child.request("recv", "prio-act", 60.0)
    kv_handle = await local.send(child.address, "prio-kv", kv)
    await wait_until(lambda: kv_handle.num_bytes_sent >= 8 * MIB, timeout=30)
    await local.send(child.address, "prio-act", activation, TrafficClass.ACTIVATION)
    status, activation_result = await child.reply(activation_op)
    assert status == "ok" and activation_result["digests"] == [digest(activation)]
    status, kv_result = await child.reply(kv_op)
    assert status == "ok" and kv_result["digests"] == [digest(kv)]
    assert activation_result["done_at"] < kv_result["done_at"]


@pytest.mark.parametrize("backend", BACKENDS, ids=[b.value for b in BACKENDS])
async def test_a_killed_peer_is_reported_within_the_timeouts(backend, spawn_peer, make_local):
    child = spawn_peer(backend=backend.value, kv_chunk_bytes=MIB)
    local = await make_local(backend, kv_chunk_bytes=MIB, send_timeout_s=FAILURE_TIMEOUT_S)
    # child -> local: the child issues a header and its first chunks, then pauses.
    paused = child.request("send", local.address, "from-child", [(4, 64 * MIB)], "kv", 0)
    assert await child.reply(paused) == ("ok", "paused")
    receiving = asyncio.create_task(local.recv("from-child", timeout=FAILURE_TIMEOUT_S))
    # local -> child: flowing, then paused so that it cannot finish before the kill.
    child.request("recv", "to-child", 60.0)
    sending = await local.send(child.address, "to-child", payload(3, 64 * MIB))
    await wait_until(lambda: sending.num_bytes_sent >= 4 * MIB, timeout=30)
    await wait_until(lambda: local.stats().num_bytes_received > 0)
    sending.pause()
    child.kill()
    killed_at = time.monotonic()
    sending.resume()
    with pytest.raises((TransferTimeout, PeerUnreachable)):
        await sending.wait()
    with pytest.raises((TransferTimeout, PeerUnreachable)):
        await receiving
    assert time.monotonic() - killed_at < FAILURE_TIMEOUT_S + REPORT_SLACK_S
    await assert_clean(local)
