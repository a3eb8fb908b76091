"""Cluster membership on the data plane (kvtransport/frame_auth.py), over each backend:
members with the same secret exchange byte-exact transfers; a transport with another
secret is refused (its frames dropped, a TCP connection closed); a raw TCP client that
skips or forges the HELLO is disconnected."""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest
import torch

from kvtransport import Backend, TrafficClass, TransportConfig, make_transport
from kvtransport.config import MIB
from kvtransport.frame_auth import UnauthenticatedFrame, open_hello, seal_hello
from kvtransport.tcp import FRAME, KIND_CONTROL, KIND_HELLO, parse_address
from tests.unit.kvtransport.helpers import assert_clean, pattern, wait_until

SECRET = b"s" * 32
OTHER = b"o" * 32


@pytest.fixture
async def transports(backend):
    """make(secret) -> a started transport of this test's backend; all closed at the end."""
    started = []

    async def make(secret: bytes):
        transport = make_transport(
            TransportConfig(backend=backend, cluster_secret=secret, kv_chunk_bytes=MIB)
        )
        await transport.start()
        started.append(transport)
        return transport

    yield make
    for transport in started:
        await transport.close()


@pytest.mark.parametrize("nbytes", [16, 3 * MIB + 7])  # inline (activation) and chunked (KV)
async def test_members_with_the_same_secret_transfer_byte_exact(transports, nbytes):
    sender, receiver = await transports(SECRET), await transports(SECRET)
    payload = pattern(nbytes)
    receiving = asyncio.create_task(receiver.recv("t"))
    handle = await sender.send(receiver.address, "t", payload, TrafficClass.ACTIVATION)
    (received,) = await receiving
    await handle.wait()
    assert torch.equal(received, payload)
    await assert_clean(sender, receiver)


async def test_a_transport_with_another_secret_is_refused(transports, backend, caplog):
    receiver = await transports(SECRET)
    outsider, member = await transports(OTHER), await transports(SECRET)
    receiving = asyncio.create_task(receiver.recv("forged"))
    caplog.set_level(logging.WARNING, logger="kvtransport")
    await outsider.send(receiver.address, "forged", pattern(16), TrafficClass.ACTIVATION)
    refusal = (
        "closing a data-plane connection from a non-member"
        if backend is Backend.TCP
        else "dropping a control frame from a non-member"
    )
    await wait_until(lambda: refusal in caplog.text)
    assert not receiving.done()
    assert receiver.stats().num_bytes_received == 0
    # A member's transfer of the same name is the one that arrives.
    handle = await member.send(receiver.address, "forged", pattern(16, salt=1))
    (received,) = await receiving
    await handle.wait()
    assert torch.equal(received, pattern(16, salt=1))


def _raw_connection(address: bytes) -> socket.socket:
    sock = socket.create_connection(parse_address(address), timeout=10)
    sock.settimeout(10)
    return sock


@pytest.mark.parametrize("backend", [Backend.TCP], ids=["tcp"])
@pytest.mark.parametrize("opening", ["forged_hello", "no_hello", "unsigned_hello"])
async def test_tcp_listener_closes_a_connection_without_a_members_hello(transports, opening):
    receiver = await transports(SECRET)
    own = b"tcp:127.0.0.1:1"
    frames = {
        "forged_hello": [(KIND_HELLO, seal_hello(OTHER, own))],
        "unsigned_hello": [(KIND_HELLO, own)],
        "no_hello": [(KIND_CONTROL, b"KVT1" + bytes(20))],
    }[opening]

    def exchange() -> str:
        with _raw_connection(receiver.address) as sock:
            for kind, body in frames:
                sock.sendall(FRAME.pack(kind, 0, 0, len(body)) + body)
            try:  # the listener never answers: b"" or a reset means it closed the socket
                return "closed" if sock.recv(1) == b"" else "answered"
            except ConnectionResetError:
                return "closed"

    assert await asyncio.to_thread(exchange) == "closed"


def test_hello_round_trip_and_refusals():
    body = seal_hello(SECRET, b"tcp:h:1", now=1000.0)
    assert open_hello(SECRET, body, now=1000.0) == b"tcp:h:1"
    with pytest.raises(UnauthenticatedFrame, match="MAC"):
        open_hello(OTHER, body, now=1000.0)
    with pytest.raises(UnauthenticatedFrame, match="window"):
        open_hello(SECRET, body, now=1000.0 + 3600)
    tampered = body[:-40] + bytes([body[-40] ^ 1]) + body[-39:]
    with pytest.raises(UnauthenticatedFrame, match="MAC"):
        open_hello(SECRET, tampered, now=1000.0)
