"""TCP wire (asyncio sockets): the fallback for platforms without UCX.

One connection per direction and peer pair (A's sends to B use A's connection to B's
listener; B's Rejects to A use B's connection to A). Every frame has a fixed prefix:

    0     1      4      8             16            24
    | kind | pad |  seq |     key      |   nbytes    |  then nbytes of body
    kind: HELLO (body: the connecting transport's address), CONTROL (body: a wire
    frame), CHUNK (body: chunk `seq` of transfer `key`, read straight into the posted
    buffer, or staged in a pooled buffer until the receiver posts one).

A connection's writer takes activation frames before KV frames, so an activation waits
at most for the frame being written (a chunk boundary). A broken connection fails the
peer at once (PeerUnreachable), unlike UCX where a timeout notices.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
import struct
from collections.abc import Sequence

import numpy as np

from kvtransport.buffers import BufferPool
from kvtransport.config import TransportConfig
from kvtransport.core import FabricTransport
from kvtransport.errors import PeerUnreachable, TransferCancelled, TransportError
from kvtransport.fabric import ChunkOut, Fabric, FabricEvents, OutMessage, PeerLink
from kvtransport.frame_auth import (
    UnauthenticatedFrame,
    check,
    mac_bytes,
    open_hello,
    seal,
    seal_hello,
)
from kvtransport.traffic import TrafficClass
from kvtransport.wire import decode
from services.common.addresses import advertised_address

log = logging.getLogger(__name__)

ADDRESS_PREFIX = b"tcp:"
FRAME = struct.Struct("<B3xIQQ")
KIND_HELLO, KIND_CONTROL, KIND_CHUNK = 0, 1, 2
MAX_HELLO_BYTES = 4096
CONNECT_TIMEOUT_S = 10.0
SKIP_PIECE_BYTES = 1 << 20


class _ProtocolError(Exception):
    pass


def parse_address(address: bytes) -> tuple[str, int]:
    if not address.startswith(ADDRESS_PREFIX):
        raise ValueError(f"not a TCP transport address: {bytes(address[:16])!r}")
    host, _, port = address[len(ADDRESS_PREFIX) :].decode().rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"TCP transport address must be tcp:HOST:PORT, got {address!r}")
    return host, int(port)


async def _recv_exactly(loop, sock: socket.socket, view: memoryview) -> None:
    while view:
        num_read = await loop.sock_recv_into(sock, view)
        if num_read == 0:
            raise ConnectionResetError("peer closed the connection")
        view = view[num_read:]


class TcpLink(PeerLink):
    def __init__(self, loop, sock: socket.socket, own_address: bytes, secret: bytes = b"") -> None:
        self._loop = loop
        self._sock = sock
        self._secret = secret
        # Lane 0: activations and control; lane 1: KV. Items: (prefix, body, future).
        self._lanes: tuple[collections.deque, collections.deque] = (
            collections.deque(),
            collections.deque(),
        )
        self._current: asyncio.Future | None = None
        self._wakeup = asyncio.Event()
        self._is_aborted = False
        body = seal_hello(secret, own_address)
        hello = FRAME.pack(KIND_HELLO, 0, 0, len(body))
        self._lanes[0].append((hello, body, loop.create_future()))
        self._writer = loop.create_task(self._write_loop())

    @property
    def num_queued(self) -> int:
        return len(self._lanes[0]) + len(self._lanes[1]) + (self._current is not None)

    def start_send(self, message: OutMessage) -> asyncio.Future[None]:
        if self._is_aborted:
            raise PeerUnreachable("link aborted")
        if isinstance(message, ChunkOut):
            prefix = FRAME.pack(KIND_CHUNK, message.seq, message.key, message.view.nbytes)
            body: bytes | memoryview = memoryview(message.view)
        else:
            body = seal(self._secret, message.frame)
            prefix = FRAME.pack(KIND_CONTROL, 0, 0, len(body))
        future = self._loop.create_future()
        lane = 1 if message.traffic_class is TrafficClass.KV else 0
        self._lanes[lane].append((prefix, body, future))
        self._wakeup.set()
        return future

    async def abort(self) -> None:
        if self._is_aborted:
            return
        self._is_aborted = True
        self._writer.cancel()
        await asyncio.gather(self._writer, return_exceptions=True)
        self._sock.close()
        self._fail_all(PeerUnreachable("link aborted"))

    async def _write_loop(self) -> None:
        try:
            while True:
                lane = self._lanes[0] or self._lanes[1]
                if not lane:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                prefix, body, future = lane.popleft()
                self._current = future
                await self._loop.sock_sendall(self._sock, prefix)
                if body:
                    await self._loop.sock_sendall(self._sock, body)
                self._current = None
                if not future.done():
                    future.set_result(None)
        except OSError as exc:
            self._is_aborted = True
            self._sock.close()
            self._fail_all(PeerUnreachable(f"TCP send failed: {exc}"))

    def _fail_all(self, error: TransportError) -> None:
        futures = [item[2] for lane in self._lanes for item in lane]
        if self._current is not None:
            futures.append(self._current)
        self._current = None
        for lane in self._lanes:
            lane.clear()
        for future in futures:
            if not future.done():
                future.set_exception(error)
                future.exception()


class TcpFabric(Fabric):
    def __init__(self, config: TransportConfig, pool: BufferPool) -> None:
        self._config = config
        self._pool = pool
        self._links: set[TcpLink] = set()
        self._readers: set[asyncio.Task] = set()
        self._targets: dict[tuple[int, int], tuple[np.ndarray, asyncio.Future]] = {}
        self._staged: dict[tuple[int, int], tuple[object, int]] = {}
        self._discard_until: dict[int, float] = {}  # keys whose chunks are dropped on arrival
        self._reading: tuple[int, asyncio.Future] | None = None
        self._is_closing = False

    @property
    def address(self) -> bytes:
        return self._address

    async def start(self, events: FabricEvents) -> None:
        self._events = events
        self._loop = asyncio.get_running_loop()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((self._config.tcp_host, self._config.tcp_port))
        self._listener.listen(128)
        self._listener.setblocking(False)
        host, port = self._listener.getsockname()[:2]
        advertised = advertised_address(f"{host}:{port}", self._config.tcp_advertise_address)
        self._address = ADDRESS_PREFIX + advertised.encode()
        self._accept_task = self._loop.create_task(self._accept_loop())

    async def connect(self, peer_address: bytes) -> PeerLink:
        host, port = parse_address(peer_address)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            await asyncio.wait_for(self._loop.sock_connect(sock, (host, port)), CONNECT_TIMEOUT_S)
        except (OSError, TimeoutError) as exc:
            sock.close()
            raise PeerUnreachable(f"cannot connect to {host}:{port}: {exc!r}") from exc
        link = TcpLink(self._loop, sock, self.address, self._config.cluster_secret)
        self._links.add(link)
        return link

    def post_chunks(
        self, key: int, targets: Sequence[tuple[int, np.ndarray]]
    ) -> list[asyncio.Future[None]]:
        futures = []
        for seq, view in targets:
            future = self._loop.create_future()
            staged = self._staged.pop((key, seq), None)
            if staged is None:
                self._targets[(key, seq)] = (view, future)
            else:
                self._fill_from_staged((view, future), *staged, seq)
            futures.append(future)
        return futures

    def finish_chunks(self, key: int) -> None:
        pass  # targets leave the table as they are filled

    async def abort_chunks(self, key: int) -> None:
        for target_key in [k for k in self._targets if k[0] == key]:
            _, future = self._targets.pop(target_key)
            if not future.done():
                future.set_exception(TransferCancelled("receive withdrawn"))
                future.exception()
        if self._reading is not None and self._reading[0] == key:
            await asyncio.shield(self._reading[1])  # a chunk is being read into the buffer
        self._discard(key)

    async def drain_chunks(
        self, key: int, sizes: Sequence[tuple[int, int]], timeout: float
    ) -> None:
        self._discard(key)  # a stream cannot hold chunks back: drop them as they arrive

    def num_pending(self) -> int:
        queued = sum(link.num_queued for link in self._links if not link._is_aborted)
        return len(self._targets) + len(self._staged) + queued

    async def close(self) -> None:
        self._is_closing = True
        self._accept_task.cancel()
        for task in list(self._readers):
            task.cancel()
        await asyncio.gather(self._accept_task, *self._readers, return_exceptions=True)
        self._listener.close()
        for link in list(self._links):
            await link.abort()
        for _, future in self._targets.values():
            if not future.done():
                future.set_exception(TransportError("transport closed"))
                future.exception()
        self._targets.clear()
        for buffer, _ in self._staged.values():
            self._pool.release(buffer)
        self._staged.clear()

    # -- internals --------------------------------------------------------------------

    def _discard(self, key: int) -> None:
        now = self._loop.time()
        self._discard_until[key] = now + self._config.tombstone_ttl_s
        for stale in [k for k, until in self._discard_until.items() if until < now]:
            del self._discard_until[stale]
        for staged_key in [k for k in self._staged if k[0] == key]:
            buffer, _ = self._staged.pop(staged_key)
            self._pool.release(buffer)

    def _fill_from_staged(self, target, buffer, num_bytes: int, seq: int) -> None:
        view, future = target
        if num_bytes == view.nbytes:
            view[:] = buffer[:num_bytes].numpy()
            future.set_result(None)
        else:
            future.set_exception(TransportError(f"chunk {seq} has {num_bytes} bytes"))
        self._pool.release(buffer)

    async def _accept_loop(self) -> None:
        while True:
            conn, _ = await self._loop.sock_accept(self._listener)
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = self._loop.create_task(self._read_loop(conn))
            self._readers.add(task)
            task.add_done_callback(self._readers.discard)

    async def _read_loop(self, conn: socket.socket) -> None:
        peer: bytes | None = None
        secret = self._config.cluster_secret
        prefix = bytearray(FRAME.size)
        try:
            while True:
                await _recv_exactly(self._loop, conn, memoryview(prefix))
                kind, seq, key, num_bytes = FRAME.unpack(prefix)
                if peer is None and kind != KIND_HELLO and secret:
                    raise UnauthenticatedFrame("a frame before the HELLO")
                if kind == KIND_CHUNK:
                    await self._read_chunk(conn, key, seq, num_bytes)
                    continue
                limit = MAX_HELLO_BYTES if kind == KIND_HELLO else self._config.mailbox_slot_bytes
                if kind not in (KIND_HELLO, KIND_CONTROL) or num_bytes > limit:
                    raise _ProtocolError(f"bad frame kind={kind} nbytes={num_bytes}")
                body = bytearray(num_bytes)
                await _recv_exactly(self._loop, conn, memoryview(body))
                if kind == KIND_HELLO:
                    peer = open_hello(secret, bytes(body))  # a non-member's: closed
                    continue
                try:
                    message, payload = decode(check(secret, body, len(body) - mac_bytes(secret)))
                    self._events.on_control(message, payload)
                except Exception:  # one bad message must not kill the connection
                    log.exception("dropping a control message")
        except UnauthenticatedFrame as exc:
            log.warning("closing a data-plane connection from a non-member: %s", exc)
        except (OSError, _ProtocolError) as exc:
            if peer is not None and not self._is_closing:
                self._events.on_peer_lost(peer, PeerUnreachable(f"connection lost: {exc}"))
        finally:
            conn.close()

    async def _read_chunk(self, conn: socket.socket, key: int, seq: int, num_bytes: int) -> None:
        target = self._targets.pop((key, seq), None)
        if target is None:
            if key in self._discard_until:
                await self._skip(conn, num_bytes)
                return
            buffer = self._pool.acquire(num_bytes)
            try:
                await _recv_exactly(self._loop, conn, memoryview(buffer[:num_bytes].numpy()))
            except BaseException:
                self._pool.release(buffer)
                raise
            # While it was being read, the transfer may have been cancelled or posted.
            late_target = self._targets.pop((key, seq), None)
            if late_target is not None:
                self._fill_from_staged(late_target, buffer, num_bytes, seq)
            elif key in self._discard_until:
                self._pool.release(buffer)
            else:
                self._staged[(key, seq)] = (buffer, num_bytes)
            return
        view, future = target
        if view.nbytes != num_bytes:
            future.set_exception(
                TransportError(f"chunk {seq} has {num_bytes} bytes, buffer {view.nbytes}")
            )
            await self._skip(conn, num_bytes)
            return
        done = self._loop.create_future()
        self._reading = (key, done)
        try:
            await _recv_exactly(self._loop, conn, memoryview(view))
        except BaseException as exc:
            if not future.done():
                future.set_exception(PeerUnreachable(f"connection lost mid-chunk: {exc!r}"))
                future.exception()
            raise
        finally:
            self._reading = None
            done.set_result(None)
        if not future.done():
            future.set_result(None)

    async def _skip(self, conn: socket.socket, num_bytes: int) -> None:
        scratch = memoryview(bytearray(min(num_bytes, SKIP_PIECE_BYTES)))
        while num_bytes:
            piece = min(num_bytes, len(scratch))
            await _recv_exactly(self._loop, conn, scratch[:piece])
            num_bytes -= piece


class TcpTransport(FabricTransport):
    """Transport over asyncio TCP sockets; same behaviour as UcxTransport, slower."""

    def __init__(self, config: TransportConfig) -> None:
        pool = BufferPool(config.recv_pool_max_bytes)
        super().__init__(config, TcpFabric(config, pool), pool)
