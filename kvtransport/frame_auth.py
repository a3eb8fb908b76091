"""Cluster membership on the data plane: control frames carry an HMAC of the cluster secret.

The data plane has no login of its own: a UCX peer reaches a worker's mailbox by its
worker address, and a TCP peer by its port. So every control frame (transfer headers
with their inline payloads, cancels, rejects, rechunks) is sealed by its sender with
HMAC-SHA256(secret, frame), appended as MAC_BYTES; the receiver checks it in constant
time and drops a frame that fails (logged), before decoding it. The TCP backend also
opens each connection with a sealed HELLO and closes a connection whose HELLO fails.

KV chunks are not sealed (they go straight into buffers the receiver posted for a
transfer key that only a sealed header announced). With an empty secret (a transport
built outside a worker: benches, unit tests) frames travel as before.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import time

from kvtransport.errors import TransportError
from kvtransport.wire import PREFIX

MAC_BYTES = 32


class UnauthenticatedFrame(TransportError):
    """A control frame or HELLO whose MAC is missing or wrong: not from a cluster member."""


def mac_bytes(secret: bytes) -> int:
    """Bytes a sealed frame adds (0 without a secret)."""
    return MAC_BYTES if secret else 0


def _mac(secret: bytes, data) -> bytes:
    return hmac.new(secret, bytes(data), hashlib.sha256).digest()


def seal(secret: bytes, frame: bytes) -> bytes:
    """`frame` followed by its MAC (unchanged without a secret)."""
    return frame + _mac(secret, frame) if secret else frame


def check(secret: bytes, data: memoryview | bytes, num_bytes: int) -> memoryview:
    """The first num_bytes of data when the MAC follows them, else UnauthenticatedFrame."""
    view = memoryview(data)
    if not secret:
        return view
    if num_bytes < 0 or len(view) < num_bytes + MAC_BYTES:
        raise UnauthenticatedFrame("control frame without a MAC")
    if not hmac.compare_digest(
        _mac(secret, view[:num_bytes]), view[num_bytes : num_bytes + MAC_BYTES]
    ):
        raise UnauthenticatedFrame("control frame MAC does not match the cluster secret")
    return view[:num_bytes]


def unseal(secret: bytes, buffer: memoryview) -> memoryview:
    """The control frame at the start of `buffer` (which may be longer), MAC checked."""
    if not secret:
        return buffer
    if len(buffer) < PREFIX.size:
        raise UnauthenticatedFrame(f"control frame too short: {len(buffer)} bytes")
    _, _, meta_len, payload_len = PREFIX.unpack_from(buffer)
    return check(secret, buffer, PREFIX.size + meta_len + payload_len)


HELLO_TAG = b"llmesh-kvt-hello"
HELLO_MAX_SKEW_S = 300
_HELLO_STAMP = struct.Struct("<Q16s")  # unix seconds, nonce


def seal_hello(secret: bytes, address: bytes, now: float | None = None) -> bytes:
    """A TCP connection's first frame: the connecting transport's address, and (with a
    secret) a timestamp, a nonce and the MAC of all three."""
    if not secret:
        return address
    stamp = _HELLO_STAMP.pack(int(time.time() if now is None else now), os.urandom(16))
    body = stamp + address
    return body + _mac(secret, HELLO_TAG + body)


def open_hello(secret: bytes, body: bytes, now: float | None = None) -> bytes:
    """The address a HELLO announces; UnauthenticatedFrame when it is not a member's."""
    if not secret:
        return body
    if len(body) < _HELLO_STAMP.size + MAC_BYTES:
        raise UnauthenticatedFrame("HELLO without a MAC")
    signed, mac = body[:-MAC_BYTES], body[-MAC_BYTES:]
    if not hmac.compare_digest(_mac(secret, HELLO_TAG + signed), mac):
        raise UnauthenticatedFrame("HELLO MAC does not match the cluster secret")
    timestamp, _ = _HELLO_STAMP.unpack_from(signed)
    if abs((time.time() if now is None else now) - timestamp) > HELLO_MAX_SKEW_S:
        raise UnauthenticatedFrame("HELLO timestamp outside the accepted window")
    return bytes(signed[_HELLO_STAMP.size :])
