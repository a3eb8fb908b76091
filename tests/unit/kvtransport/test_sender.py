"""Sender: how new transfers are planned (chunk size by traffic and activation flow)."""

from __future__ import annotations

import asyncio

import torch

from kvtransport import SchedulingPolicy, TrafficClass, TransportConfig
from kvtransport.fabric import ChunkOut, ControlOut, PeerLink
from kvtransport.sender import Sender
from kvtransport.traffic import ActivationFlow
from kvtransport.wire import TransferHeader, decode
from tests.clock import FakeClock

KIB = 1024


class RecordingLink(PeerLink):
    def __init__(self) -> None:
        self.sent: list = []

    def start_send(self, message):
        self.sent.append(message)
        return asyncio.get_running_loop().create_future()  # never completes: nothing moves

    async def abort(self) -> None:
        pass


class OneLinkFabric:
    """Just what Sender uses of a Fabric: an address and connect()."""

    address = b"fake:self"

    def __init__(self) -> None:
        self.link = RecordingLink()

    async def connect(self, peer_address: bytes) -> PeerLink:
        return self.link

    def headers(self) -> list[TransferHeader]:
        frames = [m.frame for m in self.link.sent if isinstance(m, ControlOut)]
        return [decode(memoryview(frame))[0] for frame in frames]

    def chunk_sizes(self, key: int) -> list[int]:
        return [m.view.nbytes for m in self.link.sent if isinstance(m, ChunkOut) and m.key == key]


def _sender(**config_kwargs) -> tuple[Sender, OneLinkFabric, ActivationFlow, FakeClock]:
    config = TransportConfig(
        kv_chunk_bytes=64 * KIB, kv_chunk_bytes_with_activations=16 * KIB, **config_kwargs
    )
    clock = FakeClock(5.0)
    activations = ActivationFlow(config.activation_quiet_s, clock=clock)
    fabric = OneLinkFabric()
    return Sender(fabric, config, activations), fabric, activations, clock


async def test_kv_transfers_started_while_activations_flow_use_the_smaller_chunks():
    sender, fabric, activations, clock = _sender(kv_window=4)
    payload = torch.zeros(128 * KIB, dtype=torch.uint8)
    quiet = await sender.send(b"peer", "kv-quiet", payload, TrafficClass.KV, None)
    activations.note_activation()  # e.g. one arrived from any peer
    flowing = await sender.send(b"peer", "kv-flowing", payload, TrafficClass.KV, None)
    clock.now += 1.0  # longer than activation_quiet_s (0.1 s)
    later = await sender.send(b"peer", "kv-later", payload, TrafficClass.KV, None)
    headers = {h.transfer_id: h for h in fabric.headers()}
    assert headers["kv-quiet"].chunk_bytes == 64 * KIB
    assert headers["kv-flowing"].chunk_bytes == 16 * KIB
    assert headers["kv-later"].chunk_bytes == 64 * KIB
    for handle in (quiet, flowing, later):
        assert handle.num_bytes_total == 128 * KIB
    await sender.close()


async def test_activations_are_never_chunked_and_note_the_flow_when_issued():
    sender, fabric, activations, _ = _sender()
    assert not activations.is_flowing
    await sender.send(b"peer", "act", torch.zeros(256 * KIB, dtype=torch.uint8), "activation", None)
    (header,) = fabric.headers()
    assert (header.chunk_bytes, header.is_inline) == (0, False)
    assert fabric.chunk_sizes(header.key) == [256 * KIB]  # one message, issued at once
    assert activations.is_flowing
    await sender.close()


async def test_the_fifo_baseline_keeps_the_configured_chunks():
    sender, fabric, activations, _ = _sender(scheduling=SchedulingPolicy.FIFO)
    activations.note_activation()
    await sender.send(b"peer", "kv", torch.zeros(128 * KIB, dtype=torch.uint8), "kv", None)
    (header,) = fabric.headers()
    assert header.chunk_bytes == 64 * KIB
    await sender.close()
