"""Push every step's new tokens to the gateways that own the requests.

One long-lived OutputSink.PushOutputs stream per gateway. Each engine step becomes at
most one OutputBatch per gateway; if the stream falls behind, queued steps are merged
into one message (fewer, larger messages under load, never more than one per step).

If a gateway cannot be reached for `owner_unreachable_s`, nobody can receive its
requests' tokens any more: `on_owner_gone(request_ids)` lets the worker abort them.
Until then a client may resume them on another gateway: `rehome` points a request's
outputs there, and `ledger` (services.worker.output_ledger) holds what it needs to
take the request over, including requests that finished up to that long ago.
Long-lived streams carry no deadline; channel keepalive detects a dead peer instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import time
from collections.abc import Callable

import grpc

from protos import gateway_pb2_grpc
from services.common.convert import outputs_to_proto
from services.common.grpc_client import aio_channel
from services.common.logging import get_logger
from services.common.messages import OutputDelta
from services.worker.output_ledger import OutputLedger

log = get_logger(__name__)

_CLOSE = None  # queue sentinel


class OwnerLink:
    """The stream to one gateway."""

    def __init__(self, router: OutputRouter, address: str) -> None:
        self.router = router
        self.address = address
        self.queue: asyncio.Queue[list[OutputDelta] | None] = asyncio.Queue()
        # Not the context of the request that happened to open the stream.
        self.task = asyncio.create_task(self._run(), context=router.root_context.copy())
        self.num_batches_sent = 0
        self.is_closing = False
        self.failing_since: float | None = None  # when the stream last broke, if down
        self._backoff_s = 0.05

    async def _run(self) -> None:
        channel = aio_channel(self.address)
        stub = gateway_pb2_grpc.OutputSinkStub(channel)
        try:
            while True:
                try:
                    if await self._stream(stub):
                        return
                    problem = "closed by the gateway"  # it is shutting down
                except grpc.aio.AioRpcError as exc:
                    problem = exc.code().name
                now = time.monotonic()
                if self.failing_since is None:
                    log.warning("output_stream_failed", owner=self.address, problem=problem)
                    self.failing_since = now
                    self._backoff_s = 0.05
                elif now - self.failing_since > self.router.owner_unreachable_s:
                    self.router._owner_gone(self)
                    return
                await asyncio.sleep(self._backoff_s)
                self._backoff_s = min(self._backoff_s * 2, 1.0)
        finally:
            await channel.close()

    async def _stream(self, stub) -> bool:
        """One PushOutputs stream until it ends; True once the link closed cleanly.

        A batch leaves the queue only into a connected stream, and goes back to the
        front of the queue if its write fails: a stream that broke (the gateway died,
        or restarted at the same address while this channel was still reconnecting)
        never swallows the tokens of the requests the next stream carries. A batch
        written just before its gateway died may reach the next incarnation too: the
        gateway drops tokens it has (duplicates) and aborts requests it does not know.
        """
        call = stub.PushOutputs()
        ended = asyncio.ensure_future(_response(call))
        try:
            await call.wait_for_connection()
            self.failing_since = None  # the stream is up and taking messages
            while True:
                getting = asyncio.ensure_future(self.queue.get())
                await asyncio.wait({getting, ended}, return_when=asyncio.FIRST_COMPLETED)
                if not getting.done():  # the gateway ended the stream first
                    getting.cancel()
                    await ended  # raises if it broke
                    return False
                deltas = self._merge_queued(getting.result())
                if deltas is _CLOSE:
                    await call.done_writing()
                    await call
                    return True
                try:
                    await call.write(outputs_to_proto(self.router.instance_id, deltas))
                except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                    self._requeue(deltas)
                    await ended  # raises the stream's error
                    return False
                self.num_batches_sent += 1
        finally:
            call.cancel()
            ended.cancel()

    def _merge_queued(self, deltas):
        """`deltas` and every step queued behind it, as one batch (up to a close)."""
        if deltas is _CLOSE:
            return _CLOSE
        while not self.queue.empty():
            more = self.queue.get_nowait()
            if more is _CLOSE:
                self._requeue(_CLOSE)
                break
            deltas = deltas + more
        return deltas

    def _requeue(self, deltas) -> None:
        """Put deltas back at the front of the queue (asyncio.Queue has no push-front)."""
        rest = []
        while not self.queue.empty():
            rest.append(self.queue.get_nowait())
        for item in (deltas, *rest):
            self.queue.put_nowait(item)


async def _response(call) -> None:
    """The stream's end: returns when the gateway answered, raises if it broke."""
    await call


class OutputRouter:
    def __init__(
        self,
        instance_id: str,
        owner_unreachable_s: float,
        on_owner_gone: Callable[[list[str]], None],
    ) -> None:
        self.instance_id = instance_id
        self.owner_unreachable_s = owner_unreachable_s
        self._on_owner_gone = on_owner_gone
        self._owner_of: dict[str, str] = {}  # request id -> gateway address
        self._links: dict[str, OwnerLink] = {}
        # Finished requests stay resumable as long as an unreachable owner's requests do.
        self.ledger = OutputLedger(owner_unreachable_s)
        self.root_context = contextvars.copy_context()

    def register(self, request_id: str, owner_address: str) -> None:
        self._owner_of[request_id] = owner_address
        if owner_address not in self._links:
            self._links[owner_address] = OwnerLink(self, owner_address)

    def unregister(self, request_id: str) -> None:
        self._owner_of.pop(request_id, None)
        self.ledger.discard(request_id)

    def rehome(self, request_id: str, owner_address: str) -> None:
        """Every output published from now on goes to `owner_address` (a failover)."""
        if request_id in self._owner_of:
            self.register(request_id, owner_address)

    def owner_of(self, request_id: str) -> str | None:
        return self._owner_of.get(request_id)

    def publish(self, deltas: list[OutputDelta]) -> None:
        """Queue one step's outputs: one list per gateway."""
        self.ledger.record(deltas)
        by_owner: dict[str, list[OutputDelta]] = {}
        for delta in deltas:
            owner = self._owner_of.get(delta.request_id)
            if owner is not None:
                by_owner.setdefault(owner, []).append(delta)
        for owner, owned in by_owner.items():
            link = self._links.get(owner)
            if link is None:
                link = self._links[owner] = OwnerLink(self, owner)
            link.queue.put_nowait(owned)

    def _owner_gone(self, link: OwnerLink) -> None:
        if self._links.get(link.address) is link:
            del self._links[link.address]
        request_ids = [r for r, owner in self._owner_of.items() if owner == link.address]
        log.warning("owner_gone", owner=link.address, num_requests=len(request_ids))
        if request_ids:
            self._on_owner_gone(request_ids)

    async def close(self, timeout_s: float = 2.0) -> None:
        """Flush what is queued, then close every stream."""
        links = list(self._links.values())
        self._links.clear()
        for link in links:
            link.is_closing = True
            link.queue.put_nowait(_CLOSE)
        for link in links:
            if link.failing_since is not None:  # no live stream to flush into
                link.task.cancel()
            try:
                await asyncio.wait_for(link.task, timeout_s)
            except (TimeoutError, asyncio.CancelledError):
                link.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await link.task
