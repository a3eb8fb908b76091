"""Fixtures for kvtransport tests: transports of each backend, child-process peers."""

from __future__ import annotations

import pytest

from kvtransport import Backend, TransportConfig, make_transport
from tests.unit.kvtransport.peer_process import PeerProcess

BACKENDS = [Backend.UCX, Backend.TCP]


@pytest.fixture(params=BACKENDS, ids=[b.value for b in BACKENDS])
def backend(request) -> Backend:
    return request.param


@pytest.fixture
async def make_pair(backend):
    """make_pair(**config) -> (sender, receiver): two started transports in this process."""
    transports = []

    async def make(**config_kwargs):
        config = TransportConfig(backend=backend, **config_kwargs)
        pair = (make_transport(config), make_transport(config))
        for transport in pair:
            transports.append(transport)
            await transport.start()
        return pair

    yield make
    for transport in transports:
        await transport.close()


@pytest.fixture
def spawn_peer():
    """spawn_peer(**config) -> PeerProcess; every child is stopped, or killed, at the end."""
    peers: list[PeerProcess] = []

    def spawn(**config_kwargs) -> PeerProcess:
        peer = PeerProcess(**config_kwargs)
        peers.append(peer)
        return peer

    yield spawn
    for peer in peers:
        try:
            peer.stop()
        finally:
            peer.kill()
