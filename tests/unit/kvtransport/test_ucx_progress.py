"""UCX progress modes: fine slices only while activations flow (UCX backend only)."""

from __future__ import annotations

import asyncio
import contextlib

import torch

from kvtransport import Backend, TrafficClass, TransportConfig, make_transport
from kvtransport.config import MIB
from tests.clock import FakeClock
from tests.unit.kvtransport.helpers import assert_clean, pattern

QUIET_S = 0.3


def _worker(transport):
    return transport._fabric._worker


async def _round_trip(sender, receiver, transfer_id, payload, traffic_class):
    receiving = asyncio.create_task(receiver.recv(transfer_id))
    handle = await sender.send(receiver.address, transfer_id, payload, traffic_class)
    (received,) = await receiving
    await handle.wait()
    assert torch.equal(received, payload)


@contextlib.asynccontextmanager
async def _ucx_pair(**config_kwargs):
    config = TransportConfig(backend=Backend.UCX, **config_kwargs)
    sender, receiver = make_transport(config), make_transport(config)
    await sender.start()
    await receiver.start()
    try:
        yield sender, receiver
        await assert_clean(sender, receiver)
    finally:
        await sender.close()
        await receiver.close()


async def test_activations_switch_both_ends_to_fine_slices_until_quiet():
    async with _ucx_pair(kv_chunk_bytes=MIB, activation_quiet_s=QUIET_S) as (sender, receiver):
        clock = FakeClock(1000.0)  # the quiet time passes when the test says so
        sender._activations._clock = receiver._activations._clock = clock
        # KV alone (3 MiB in 1 MiB chunks, 4 messages) leaves both in bulk mode.
        await _round_trip(sender, receiver, "kv-0", pattern(3 * MIB + 5), TrafficClass.KV)
        assert not _worker(sender).is_latency_mode
        assert not _worker(receiver).is_latency_mode
        # One activation: the sender on issuing it, the receiver on its header.
        act = pattern(200_000, salt=3)  # over the inline limit: header and a chunk
        await _round_trip(sender, receiver, "act-0", act, TrafficClass.ACTIVATION)
        assert _worker(sender).is_latency_mode
        assert _worker(receiver).is_latency_mode
        # KV meanwhile still arrives byte-exact in the fine-sliced mode.
        await _round_trip(sender, receiver, "kv-1", pattern(5 * MIB, salt=4), TrafficClass.KV)
        clock.now += QUIET_S - 0.05
        assert _worker(sender).is_latency_mode
        assert _worker(receiver).is_latency_mode
        clock.now += 0.1  # no activation for longer than activation_quiet_s
        assert not _worker(sender).is_latency_mode
        assert not _worker(receiver).is_latency_mode


async def test_zero_quiet_time_never_enters_fine_slices():
    async with _ucx_pair(activation_quiet_s=0) as (sender, receiver):
        act = pattern(32 * 1024, salt=5)  # inline: the header carries it
        await _round_trip(sender, receiver, "act-0", act, TrafficClass.ACTIVATION)
        assert not _worker(sender).is_latency_mode
        assert not _worker(receiver).is_latency_mode
