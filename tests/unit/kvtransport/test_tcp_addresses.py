"""The TCP data plane binds one address and advertises another (NAT, containers)."""

from __future__ import annotations

import asyncio
import socket

import pytest
import torch

from kvtransport import Backend, TransportConfig, make_transport
from services.common.config import ConfigError
from tests.unit.kvtransport.helpers import pattern


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_peers_connect_to_the_advertised_address_not_the_bound_one():
    port = free_port()
    receiver = make_transport(
        TransportConfig(
            backend=Backend.TCP,
            tcp_host="0.0.0.0",
            tcp_port=port,
            tcp_advertise_address=f"localhost:{port}",
        )
    )
    sender = make_transport(TransportConfig(backend=Backend.TCP))
    await receiver.start()
    await sender.start()
    try:
        assert receiver.address == f"tcp:localhost:{port}".encode()
        payload = pattern(3 * 2**20 + 5)
        receiving = asyncio.create_task(receiver.recv("advertised"))
        handle = await sender.send(receiver.address, "advertised", payload)
        (received,) = await receiving
        await handle.wait()
        assert torch.equal(received, payload)
    finally:
        await sender.close()
        await receiver.close()


async def test_a_wildcard_bind_advertises_the_host_name():
    transport = make_transport(TransportConfig(backend=Backend.TCP, tcp_host="0.0.0.0"))
    await transport.start()
    try:
        host, _, port = transport.address.decode().removeprefix("tcp:").rpartition(":")
        assert host == socket.gethostname() and int(port) > 0
    finally:
        await transport.close()


def test_an_advertise_address_without_a_port_is_refused():
    with pytest.raises(ConfigError, match="tcp_advertise_address must be host:port"):
        TransportConfig(tcp_advertise_address="10.0.0.2")
