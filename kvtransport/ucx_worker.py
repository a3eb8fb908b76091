"""UcxWorker: one UCP worker progressed by the asyncio loop, its requests as futures.

Why not ucxx's ApplicationContext: its default "thread" progress mode hands every
completion through two threads (~560 us one-way for a small message measured here,
and a 1 ms epoll tick while idle); its "blocking" mode busy-polls while a request is
pending. Instead the worker's epoll fd is watched by the event loop: when it fires (or
right after we submit), we progress the worker, settle completed requests, and re-arm.
One-way latency ~250 us here with zero idle CPU, and every UCX call happens on the loop
thread (no GIL/spinlock interplay with a progress thread). The cost: UCX copies (CMA
gets of a chunk) run on the loop thread, which bounded chunk sizes keep short.

Two progress modes. While activations flow (ActivationFlow), progress runs in ~0.1 ms
slices and stops at each completion, so an activation's header is handled after the KV
chunk being copied (a chunk's CMA read happens inside one progress call: the chunk size
bounds the wait). Otherwise it runs for up to 2 ms and settles once, unless a control
frame lands: a loop turn plus a settle per completion cost as much Python as the copies
themselves (~14% of streamed throughput at 4 MiB).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import time
from collections.abc import Callable, Mapping

import numpy as np
import ucxx  # (importing it sets UCX_MEMTYPE_CACHE, UCX_RNDV_THRESH=8192 etc. when unset)
from ucxx._lib import libucxx as ucx_api
from ucxx._lib.arr import Array
from ucxx.types import Tag, TagMask, TagMaskFull

from kvtransport.errors import PeerUnreachable, TransferCancelled, TransportError
from kvtransport.traffic import ActivationFlow

log = logging.getLogger(__name__)

OnDone = Callable[[TransportError | None], None]

# A missed wakeup must never stall a transfer for long: progress at least this often
# while anything is pending (ucxx's blocking mode uses the same safety net).
WATCHDOG_INTERVAL_S = 0.05
# Longest stretch of UCX progress before the event loop gets a turn: while activations
# flow, and otherwise (when only bulk copies can be waiting behind it).
LATENCY_SLICE_S = 0.0001
BULK_SLICE_S = 0.002
# How long closing an endpoint may wait for UCX to flush/cancel (nanoseconds).
CLOSE_PERIOD_NS = 100_000_000
# Options every context gets unless the caller's say otherwise. ucxx sets
# UCX_MEMTYPE_CACHE (for old UCX versions) in the environment at import; UCX 1.21 does
# not know it and would warn at every context creation.
CONTEXT_DEFAULTS = {"WARN_UNUSED_ENV_VARS": "n"}
_UCXX_DEFAULT_RNDV_THRESH = "8192"


def is_rndv_thresh_from_user() -> bool:
    """Whether the user set UCX_RNDV_THRESH (read when a context is made). Importing ucxx
    sets it to 8192 when unset, so only another value is the user's."""
    threshold = os.environ.get("UCX_RNDV_THRESH", _UCXX_DEFAULT_RNDV_THRESH)
    return threshold != _UCXX_DEFAULT_RNDV_THRESH


def is_tls_from_user() -> bool:
    """Whether the user chose UCX's transports (UCX_TLS, read when a context is made)."""
    return "UCX_TLS" in os.environ


_PEER_ERRORS = (
    ucxx.exceptions.UCXIOError,
    ucxx.exceptions.UCXConnectionResetError,
    ucxx.exceptions.UCXUnreachableError,
    ucxx.exceptions.UCXEndpointTimeoutError,
    ucxx.exceptions.UCXNotConnectedError,
    ucxx.exceptions.UCXTimedOutError,
    ucxx.exceptions.UCXRejectedError,
)


class UcxWorker:
    def __init__(
        self,
        options: Mapping[str, str],
        peer_error_handling: bool,
        activations: ActivationFlow,
    ) -> None:
        self._options = dict(options)
        self._peer_error_handling = peer_error_handling
        # request -> (its future or callback, the Array keeping its memory alive, its endpoint)
        self._pending: dict[ucx_api.UCXRequest, tuple[asyncio.Future | OnDone, Array, object]] = {}
        self._requests_by_endpoint: dict[ucx_api.UCXEndpoint, set[ucx_api.UCXRequest]] = {}
        # Sends UCX could not withdraw when their endpoint closed (without peer error
        # handling a rendezvous send completes only when the peer fetches it). Their
        # futures failed; the buffers stay referenced until the worker closes.
        self._orphans: dict[ucx_api.UCXRequest, Array] = {}
        self._endpoints: set[ucx_api.UCXEndpoint] = set()
        # Pending tag_recv_callback receives (the mailbox: headers and control frames).
        # They settle first, and their completion ends a bulk progress slice.
        self._callback_requests: set[ucx_api.UCXRequest] = set()
        self._is_progress_scheduled = False
        self._is_closed = False
        self._activations = activations  # latency mode while they flow

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._context = ucx_api.UCXContext(
            {**CONTEXT_DEFAULTS, **self._options},
            feature_flags=(ucx_api.Feature.TAG, ucx_api.Feature.WAKEUP),
        )
        self._worker = ucx_api.UCXWorker(
            self._context, enable_delayed_submission=False, enable_python_future=False
        )
        self._worker.init_blocking_progress_mode()
        self._fd = self._worker.epoll_file_descriptor
        self._loop.add_reader(self._fd, self._on_readable)
        self._watchdog = self._loop.create_task(self._watch())
        self.address = self._worker.address.tobytes()

    @property
    def is_latency_mode(self) -> bool:
        return self._activations.is_flowing

    @property
    def num_pending(self) -> int:
        return len(self._pending)

    @property
    def num_orphaned(self) -> int:
        return len(self._orphans)

    def create_endpoint(self, worker_address: bytes) -> ucx_api.UCXEndpoint:
        address = ucx_api.UCXAddress.create_from_buffer(worker_address)
        endpoint = ucx_api.UCXEndpoint.create_from_worker_address(
            self._worker, address, self._peer_error_handling
        )
        self._endpoints.add(endpoint)
        self._requests_by_endpoint[endpoint] = set()
        return endpoint

    def close_endpoint(self, endpoint: ucx_api.UCXEndpoint) -> None:
        """Close now; its pending requests settle as cancelled on the next progress."""
        if endpoint in self._endpoints:
            self._endpoints.discard(endpoint)
            # Not close_blocking(): without a progress thread it progresses until the
            # close completes, and a flush to a peer that died mid-transfer (SIGKILL,
            # no UCX error handling) never does: the whole process froze in it (found
            # by `llmesh bench chaos`). close() submits the same close and returns;
            # the requests are settled here whatever UCX does with them later.
            endpoint.close()
            # progress() (unlike progress_once) also completes the cancellation of the
            # endpoint's requests; closing is rare, so a full progress here is fine.
            self._worker.progress()
            self._settle()
            for request in self._requests_by_endpoint.pop(endpoint, set()):
                target, array, _ = self._pending.pop(request)
                self._callback_requests.discard(request)
                self._orphans[request] = array
                _complete(target, PeerUnreachable("endpoint closed with the request in flight"))
            self._schedule_progress()

    def tag_send(self, endpoint: ucx_api.UCXEndpoint, view: np.ndarray, tag: int):
        array = Array(view)
        return self._track(endpoint.tag_send(array, Tag(tag)), array, endpoint)

    def tag_recv(self, endpoint: ucx_api.UCXEndpoint, view: np.ndarray, tag: int):
        """Receive on the worker, tracked by `endpoint` so closing it withdraws this."""
        array = Array(view)
        return self._track(endpoint.tag_recv(array, Tag(tag), TagMaskFull), array, endpoint)

    def tag_recv_callback(
        self, endpoint: ucx_api.UCXEndpoint, array: Array, tag: int, on_done: OnDone
    ) -> None:
        """Like tag_recv, but call on_done(error or None) right when UCX completes it.

        No event-loop hop between completion and the callback: what the mailbox uses,
        so that an activation's header reaches its recv() one loop turn sooner. Takes
        an `Array` (of a buffer the caller keeps) so reposting the same one is cheap.
        """
        request = endpoint.tag_recv(array, Tag(tag), TagMaskFull)
        self._pending[request] = (on_done, array, endpoint)
        self._requests_by_endpoint[endpoint].add(request)
        self._callback_requests.add(request)
        self._schedule_progress()

    def close(self) -> None:
        if self._is_closed:
            return
        self._is_closed = True
        for endpoint in list(self._endpoints):
            self.close_endpoint(endpoint)
        self._worker.cancel_inflight_requests(period=CLOSE_PERIOD_NS, max_attempts=1)
        self._worker.progress()
        self._settle()
        for target, _, _ in self._pending.values():
            _complete(target, TransportError("transport closed"))
        self._watchdog.cancel()
        self._loop.remove_reader(self._fd)
        if self._has_unexpected():
            # ucxx's Worker destructor receives every message nobody posted a receive
            # for; for a rendezvous message whose sender died or closed its endpoint
            # that segfaults inside UCX (ucp_proto_rndv_send_reply, UCX 1.21, protocol
            # v2). Such a worker is never destroyed: it is leaked until the process ends.
            log.warning("UCX worker has undelivered messages; leaking it instead of a crash")
            _immortalize(self._worker)
        self._pending.clear()
        self._callback_requests.clear()
        del self._worker, self._context

    def _has_unexpected(self) -> bool:
        return bool(self._worker.tag_probe(Tag(0), TagMask(0), remove=False).matched)

    # -- progress ---------------------------------------------------------------------

    def _track(self, request: ucx_api.UCXRequest, array: Array, endpoint) -> asyncio.Future:
        future = self._loop.create_future()
        self._pending[request] = (future, array, endpoint)
        self._requests_by_endpoint[endpoint].add(request)
        self._schedule_progress()
        return future

    def _on_readable(self) -> None:
        # The fd is level-triggered and stays readable while progress is sliced (not
        # re-armed): then a progress is already scheduled, and a second one per loop
        # turn would copy another KV chunk ahead of the tasks the first one woke (such
        # progress calls used to pile up in the ready queue: ~1 ms before an activation's
        # recv() resumed, with two 512 KiB chunks in flight).
        if not self._is_progress_scheduled or not self.is_latency_mode:
            self._progress()

    def _schedule_progress(self) -> None:
        if not self._is_progress_scheduled and not self._is_closed:
            self._is_progress_scheduled = True
            self._loop.call_soon(self._progress)

    def _progress(self) -> None:
        self._is_progress_scheduled = False
        if self._is_closed:
            return
        # One UCX progress step can be a whole KV chunk's copy (UCX performs a CMA get of
        # all its segments inside one call): take steps only for a time slice, then let
        # the loop run. While activations flow the slice is short and ends at the first
        # completion, so an activation's task resumes after the chunk being copied, not
        # after every chunk that is ready; otherwise it is long and requests are settled
        # once, at its end. (Ending a bulk slice when a control frame lands, for the
        # first activation after a quiet spell, cost ~10% of a 4 MiB stream: every
        # transfer's header ended a slice. Dropped.)
        is_latency_mode = self.is_latency_mode
        deadline = time.monotonic() + (LATENCY_SLICE_S if is_latency_mode else BULK_SLICE_S)
        is_sliced = False
        while self._worker.progress_once():
            if (is_latency_mode and self._settle(is_latency_mode)) or time.monotonic() >= deadline:
                is_sliced = True
                break
        self._settle(is_latency_mode)
        # Arming fails (busy) when events arrived meanwhile: progress again, don't sleep.
        if is_sliced or not self._worker.arm():
            self._schedule_progress()

    def _is_not_callback(self, request: ucx_api.UCXRequest) -> bool:
        return request not in self._callback_requests

    def _settle(self, is_latency_mode: bool = False) -> int:
        """Settle every completed request; returns how many. In latency mode callback
        receives go first (an activation's header then wakes its recv() ahead of the KV
        chunks' future callbacks)."""
        for request in [request for request in self._orphans if request.completed]:
            del self._orphans[request]
        done = [request for request in self._pending if request.completed]
        if is_latency_mode and len(done) > 1:
            done.sort(key=self._is_not_callback)  # stable: callback receives first
        for request in done:
            target, _, endpoint = self._pending.pop(request)
            self._callback_requests.discard(request)
            self._requests_by_endpoint.get(endpoint, set()).discard(request)
            try:
                request.check_error()
            except Exception as exc:  # noqa: BLE001 - mapped to the transport's errors
                _complete(target, _map_error(exc))
            else:
                _complete(target, None)
        return len(done)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(WATCHDOG_INTERVAL_S)
            if self._pending:
                self._schedule_progress()


def _complete(target: asyncio.Future | OnDone, error: TransportError | None) -> None:
    """Settle a request's future, or call its callback (which must not raise)."""
    if not isinstance(target, asyncio.Future):
        try:
            target(error)
        except Exception:  # a callback bug must not stop the progress of every request
            log.exception("UCX completion callback failed")
    elif not target.done():
        if error is None:
            target.set_result(None)
        else:
            target.set_exception(error)
            if isinstance(error, TransferCancelled):
                target.exception()  # withdrawn by us: nobody needs to look


def _immortalize(obj: object) -> None:
    """One reference that is never released: not even interpreter exit frees `obj`."""
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(obj))


def _map_error(exc: Exception) -> TransportError:
    if isinstance(exc, ucxx.exceptions.UCXCanceledError):
        return TransferCancelled("UCX request withdrawn")
    if isinstance(exc, _PEER_ERRORS):
        return PeerUnreachable(f"UCX: {exc}")
    if isinstance(exc, ucxx.exceptions.UCXMessageTruncatedError):
        return TransportError(f"UCX: message larger than the posted buffer ({exc})")
    return TransportError(f"UCX: {type(exc).__name__}: {exc}")
