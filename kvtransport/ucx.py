"""UCX wire (ucxx): the default backend.

Addressing: a transport's address is b"ucx:" + its UCP worker address; peers connect
with `create_endpoint_from_worker_address`, no listener or port involved.

Tag space (64-bit UCX tags, matched exactly):

    63   62 ............................ 24 23 ............. 0
    [1 ][             0                    |        0        ]   mailbox (control frames)
    [0 ][ transfer key (39 bits, random)   | chunk seq (24)  ]   chunk seq of a transfer

Receives are always posted on an endpoint, never on the bare worker, because closing an
endpoint is the only way ucxx offers to withdraw a posted receive: each receive of
chunks gets its own "scope" endpoint (to this worker itself; recycled after a clean
receive), and aborting the scope guarantees nothing writes into the caller's buffers.

Endpoints are created without UCX peer error handling by default: with it, UCX only
offers TCP between two processes on one host (~0.6 GB/s from Python); without it, it
picks shared memory and CMA (~5 GB/s). Peer death is then noticed by timeouts here and
by leases on the gRPC control plane (`Transport.drop_peer`). A dead sender's CMA reads
fail with an I/O error, which surfaces as PeerUnreachable.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from functools import partial

import numpy as np

from kvtransport.buffers import BufferPool
from kvtransport.config import TransportConfig
from kvtransport.core import FabricTransport
from kvtransport.errors import PeerUnreachable, TransportError
from kvtransport.fabric import ChunkOut, Fabric, FabricEvents, OutMessage, PeerLink
from kvtransport.frame_auth import UnauthenticatedFrame, seal, unseal
from kvtransport.traffic import ActivationFlow
from kvtransport.ucx_worker import Array, UcxWorker, is_rndv_thresh_from_user, is_tls_from_user
from kvtransport.wire import decode

log = logging.getLogger(__name__)

ADDRESS_PREFIX = b"ucx:"
_POSTED = object()  # a mailbox slot whose receive has not completed
MAILBOX_TAG = 1 << 63
SEQ_BITS = 24


def chunk_tag(key: int, seq: int) -> int:
    return (key << SEQ_BITS) | seq


def _raw_address(address: bytes) -> bytes:
    if not address.startswith(ADDRESS_PREFIX) or len(address) <= len(ADDRESS_PREFIX):
        raise ValueError(f"not a UCX transport address: {bytes(address[:16])!r}...")
    return bytes(address[len(ADDRESS_PREFIX) :])


# Every transport but CMA. Without peer error handling (docs/kvtransport.md) a CMA read
# (process_vm_readv) from a peer that just died is a fatal error: UCX aborts or crashes
# the surviving process (seen in the chaos test: a worker killed mid KV exchange took its
# peer down with it; /tmp reproductions: 1 receiver in 10 crashed with CMA, 0 in 16
# without). Rendezvous data then goes through shared memory, as fast on this host.
NO_CMA = "^cma"


def _ucx_options(config: TransportConfig) -> dict[str, str]:
    """UCX context options: the config's, plus a rendezvous threshold of one mailbox slot
    and every transport but CMA (NO_CMA) unless the config or UCX_TLS choose them.

    Everything that fits a mailbox slot (headers, inline activations) then travels
    eagerly through shared memory: no rendezvous handshake, and no waiting in UCX's
    queue behind the KV chunk reads (CMA) of the same peer, which is what lets an
    activation overtake KV inside UCX too. Chunks are always far above it.
    """
    options = dict(config.ucx_options)
    if "RNDV_THRESH" not in options and not is_rndv_thresh_from_user():
        options["RNDV_THRESH"] = str(config.mailbox_slot_bytes)
    if "TLS" not in options and not is_tls_from_user():
        options["TLS"] = NO_CMA
    return options


class UcxLink(PeerLink):
    def __init__(self, worker: UcxWorker, endpoint, secret: bytes = b"") -> None:
        self._worker = worker
        self._endpoint = endpoint
        self._secret = secret
        self._is_aborted = False

    def start_send(self, message: OutMessage) -> asyncio.Future[None]:
        if self._is_aborted:
            raise PeerUnreachable("link aborted")
        if isinstance(message, ChunkOut):
            return self._worker.tag_send(
                self._endpoint, message.view, chunk_tag(message.key, message.seq)
            )
        frame = np.frombuffer(seal(self._secret, message.frame), dtype=np.uint8)
        return self._worker.tag_send(self._endpoint, frame, MAILBOX_TAG)

    async def abort(self) -> None:
        if not self._is_aborted:
            self._is_aborted = True
            self._worker.close_endpoint(self._endpoint)


class UcxFabric(Fabric):
    def __init__(
        self, config: TransportConfig, pool: BufferPool, activations: ActivationFlow
    ) -> None:
        self._config = config
        self._pool = pool
        self._worker = UcxWorker(_ucx_options(config), config.ucx_peer_error_handling, activations)
        self._idle_scopes: list = []  # scope endpoints ready for another receive
        self._posted: dict[int, tuple[object, list[asyncio.Future]]] = {}
        self._slots: list[np.ndarray] = []
        self._slot_arrays: list[Array] = []  # each slot's buffer as UCX takes it
        self._slot_callbacks: list[Callable[[TransportError | None], None]] = []
        self._slot_outcomes: list[object] = []  # per slot: _POSTED, None (ok) or an error
        self._next_slot = 0
        self._is_closing = False

    @property
    def address(self) -> bytes:
        return ADDRESS_PREFIX + self._worker.address

    async def start(self, events: FabricEvents) -> None:
        self._events = events
        self._worker.start()
        self._mailbox_scope = self._worker.create_endpoint(self._worker.address)
        for index in range(self._config.num_mailbox_slots):
            self._slots.append(np.empty(self._config.mailbox_slot_bytes, dtype=np.uint8))
            self._slot_arrays.append(Array(self._slots[index]))
            self._slot_callbacks.append(partial(self._on_slot, index))
            self._slot_outcomes.append(_POSTED)
            self._post_slot(index)

    async def connect(self, peer_address: bytes) -> PeerLink:
        endpoint = self._worker.create_endpoint(_raw_address(peer_address))
        return UcxLink(self._worker, endpoint, self._config.cluster_secret)

    def post_chunks(
        self, key: int, targets: Sequence[tuple[int, np.ndarray]]
    ) -> list[asyncio.Future[None]]:
        if key in self._posted:  # more buffers for a transfer already receiving
            scope, futures = self._posted[key]
        else:
            scope = self._idle_scopes.pop() if self._idle_scopes else self._new_scope()
            futures = []
            self._posted[key] = (scope, futures)
        new = [self._worker.tag_recv(scope, view, chunk_tag(key, seq)) for seq, view in targets]
        futures.extend(new)
        return new

    def finish_chunks(self, key: int) -> None:
        scope, _ = self._posted.pop(key)
        self._idle_scopes.append(scope)

    async def abort_chunks(self, key: int) -> None:
        posted = self._posted.pop(key, None)
        if posted is None:
            return
        scope, futures = posted
        self._worker.close_endpoint(scope)
        await asyncio.gather(*futures, return_exceptions=True)

    async def drain_chunks(
        self, key: int, sizes: Sequence[tuple[int, int]], timeout: float
    ) -> None:
        if not sizes:
            return
        scope = self._new_scope()
        scratch = np.empty(max(nbytes for _, nbytes in sizes), dtype=np.uint8)
        futures = [
            self._worker.tag_recv(scope, scratch[:nbytes], chunk_tag(key, seq))
            for seq, nbytes in sizes
        ]
        _, not_done = await asyncio.wait(futures, timeout=timeout)
        if not_done:
            log.warning(
                "drained %d of %d chunks of key %x", len(futures) - len(not_done), len(futures), key
            )
        self._worker.close_endpoint(scope)
        await asyncio.gather(*futures, return_exceptions=True)

    def num_orphaned(self) -> int:
        return self._worker.num_orphaned

    def num_pending(self) -> int:
        return self._worker.num_pending - len(self._slots)  # mailbox slots are permanent

    async def close(self) -> None:
        self._is_closing = True
        self._worker.close()

    # -- internals --------------------------------------------------------------------

    def _new_scope(self):
        return self._worker.create_endpoint(self._worker.address)

    def _post_slot(self, index: int) -> None:
        self._slot_outcomes[index] = _POSTED
        self._worker.tag_recv_callback(
            self._mailbox_scope, self._slot_arrays[index], MAILBOX_TAG, self._slot_callbacks[index]
        )

    def _on_slot(self, index: int, error: TransportError | None) -> None:
        """Called by the worker as soon as a slot's receive completes."""
        if self._is_closing:
            return
        self._slot_outcomes[index] = error
        # Slots are matched in the order they were posted, but a small message can
        # complete before a larger one ahead of it: deliver strictly in posting order
        # (a Cancel never overtakes its header).
        while self._slot_outcomes[self._next_slot] is not _POSTED:
            ready = self._next_slot
            outcome = self._slot_outcomes[ready]
            if outcome is None:
                self._deliver(memoryview(self._slots[ready]))
            else:
                log.warning("mailbox receive failed (frame larger than a slot?): %s", outcome)
            self._post_slot(ready)
            self._next_slot = (ready + 1) % len(self._slots)

    def _deliver(self, buffer: memoryview) -> None:
        try:
            frame = unseal(self._config.cluster_secret, buffer)
        except UnauthenticatedFrame as exc:
            log.warning("dropping a control frame from a non-member: %s", exc)
            return
        try:
            message, payload = decode(frame)
            self._events.on_control(message, payload)
        except Exception:  # the mailbox must survive any one bad message
            log.exception("dropping a control message")


class UcxTransport(FabricTransport):
    """Transport over UCX (ucxx); see module docstring for how the wire is used."""

    def __init__(self, config: TransportConfig) -> None:
        pool = BufferPool(config.recv_pool_max_bytes)
        activations = ActivationFlow(config.activation_quiet_s)
        super().__init__(config, UcxFabric(config, pool, activations), pool, activations)
