"""KVExchange between two real transports in this process (TCP loopback): a send
arrives and is counted, and a send to a peer that an activation is going to is paused
until the activation is through."""

from __future__ import annotations

import asyncio

import pytest
import torch

from kvtransport import Backend, TransportConfig, make_transport
from services.common.groups import KVTransferSpec
from services.worker.kunserve.exchange import KVExchange


@pytest.fixture
async def pair():
    transports = [make_transport(TransportConfig(backend=Backend.TCP)) for _ in range(2)]
    for transport in transports:
        await transport.start()
    yield transports
    for transport in transports:
        await transport.close()


def _spec(transfer_id: str) -> KVTransferSpec:
    return KVTransferSpec(transfer_id, "req-1", 0, 1, (3, 4), (5, 6), 2, 4)


async def test_a_send_arrives_and_both_sides_count_it(pair):
    sender, receiver = pair
    outgoing, incoming = KVExchange(sender, 10.0), KVExchange(receiver, 10.0)
    data = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    written: list[torch.Tensor] = []
    sent: list[tuple[str, str]] = []
    received: list[tuple[str, str]] = []

    async def write(spec, tensor):
        written.append(tensor.clone())

    incoming.receive(_spec("kvx/a"), write, lambda s, e: received.append((s.transfer_id, e)))
    outgoing.send(
        _spec("kvx/a"), receiver.address, data, lambda s, e: sent.append((s.transfer_id, e))
    )
    assert await outgoing.wait_idle(10.0) and await incoming.wait_idle(10.0)

    assert sent == [("kvx/a", "")] and received == [("kvx/a", "")]
    assert torch.equal(written[0], data)
    assert (outgoing.stats.num_sent, outgoing.stats.num_bytes_sent) == (1, 96)
    assert (incoming.stats.num_received, incoming.stats.num_bytes_received) == (1, 96)
    assert [r.error for r in outgoing.stats.records] == [""]
    await outgoing.close()
    await incoming.close()


async def test_a_send_started_during_an_activation_is_paused_once_then_finishes(pair):
    sender, receiver = pair
    outgoing = KVExchange(sender, 10.0)
    data = torch.ones(1024)
    done: list[str] = []
    with outgoing.activation_to(receiver.address):
        outgoing.send(_spec("kvx/b"), receiver.address, data, lambda s, e: done.append(e))
        for _ in range(100):  # until the send has its handle (and was paused)
            if outgoing.stats.num_pauses:
                break
            await asyncio.sleep(0.01)
        assert outgoing.stats.num_pauses == 1
    [tensor] = await receiver.recv("kvx/b", timeout=10.0)
    assert torch.equal(tensor, data)
    assert await outgoing.wait_idle(10.0)
    assert done == [""]
    assert [r.num_pauses for r in outgoing.stats.records] == [1]
    await outgoing.close()
