"""Channels to the workers this gateway submits to, and how it learns that one died.

Each worker in use gets one channel and one grpc.health.v1 Watch stream
(services.common.health_watch): a worker killed, hung or partitioned, or turning
NOT_SERVING (graceful shutdown), counts as lost, so its requests move elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import Callable

import grpc

from protos import worker_pb2, worker_pb2_grpc
from services.common.grpc_client import aio_channel
from services.common.health_watch import watch_until_lost
from services.common.logging import get_logger

log = get_logger(__name__)

WORKER_SERVICE = "llmesh.v1.Worker"


class WorkerLink:
    """One worker: its channel, stub and health watch."""

    def __init__(self, instance_id: str, address: str) -> None:
        self.instance_id = instance_id
        self.address = address
        self.channel = aio_channel(address)
        self.stub = worker_pb2_grpc.WorkerStub(self.channel)
        self.watch_task: asyncio.Task | None = None


class WorkerPool:
    """Worker links by instance id; calls `on_lost(instance_id, reason)` when one dies."""

    def __init__(
        self,
        on_lost: Callable[[str, str], None],
        *,
        submit_timeout_s: float,
        abort_timeout_s: float,
        watch_rotate_s: float,
    ) -> None:
        self._on_lost = on_lost
        self._submit_timeout_s = submit_timeout_s
        self._abort_timeout_s = abort_timeout_s
        self._watch_rotate_s = watch_rotate_s
        self._links: dict[str, WorkerLink] = {}
        self._background: set[asyncio.Task] = set()
        # Watches outlive the request that opened them: log without its request id.
        self._root_context = contextvars.copy_context()

    def link(self, instance_id: str, address: str) -> WorkerLink:
        link = self._links.get(instance_id)
        if link is not None and link.address != address:
            self._drop(link)  # the instance came back elsewhere
            link = None
        if link is None:
            link = WorkerLink(instance_id, address)
            link.watch_task = asyncio.create_task(
                self._watch(link), context=self._root_context.copy()
            )
            self._links[instance_id] = link
        return link

    async def submit(self, instance_id: str, address: str, state) -> worker_pb2.SubmitResponse:
        link = self.link(instance_id, address)
        return await _unless_closed(
            link,
            link.stub.Submit(worker_pb2.SubmitRequest(state=state), timeout=self._submit_timeout_s),
        )

    async def rehome(
        self, instance_id: str, address: str, request_id: str, owner_address: str, next_index: int
    ) -> worker_pb2.RehomeResponse:
        """Worker.Rehome: the request's outputs come to owner_address from now on."""
        link = self.link(instance_id, address)
        request = worker_pb2.RehomeRequest(
            request_id=request_id, owner_address=owner_address, next_index=next_index
        )
        return await _unless_closed(link, link.stub.Rehome(request, timeout=self._submit_timeout_s))

    def abort_soon(self, instance_id: str, request_id: str) -> None:
        """Best-effort Worker.Abort in the background (safe to call from a cancelled task)."""
        task = asyncio.create_task(self._abort(instance_id, request_id))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _abort(self, instance_id: str, request_id: str) -> bool:
        link = self._links.get(instance_id)
        if link is None:
            return False  # lost, or never used: nothing of ours runs there
        try:
            reply = await _unless_closed(
                link,
                link.stub.Abort(
                    worker_pb2.WorkerAbortRequest(request_id=request_id),
                    timeout=self._abort_timeout_s,
                ),
            )
        except grpc.aio.AioRpcError as exc:
            log.info(
                "worker_abort_failed",
                request_id=request_id,
                instance_id=instance_id,
                code=exc.code().name,
            )
            return False
        return reply.aborted

    async def _watch(self, link: WorkerLink) -> None:
        reason = await watch_until_lost(
            link.channel, link.address, WORKER_SERVICE, self._watch_rotate_s
        )
        log.warning(
            "worker_lost", instance_id=link.instance_id, address=link.address, reason=reason
        )
        if self._links.get(link.instance_id) is link:
            del self._links[link.instance_id]
        self._on_lost(link.instance_id, reason)
        await link.channel.close()

    def _drop(self, link: WorkerLink) -> None:
        if link.watch_task is not None:
            link.watch_task.cancel()
        self._links.pop(link.instance_id, None)
        task = asyncio.create_task(link.channel.close())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        for link in list(self._links.values()):
            if link.watch_task is not None:
                link.watch_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await link.watch_task
            await link.channel.close()
        self._links.clear()
        for task in list(self._background):
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(task, timeout=1.0)


async def _unless_closed(link: WorkerLink, call):
    """Await a call on link's channel. The channel closes when the worker is found lost
    (or moved), and a call still in flight then ends in asyncio.CancelledError, not a
    status: as UNAVAILABLE here, so that callers handle it like any dead worker instead
    of passing a cancellation up that nobody asked for (a Resume handler that raised it
    sent its client no status at all: the stream hung until its deadline)."""
    try:
        return await call
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise  # this task itself is being cancelled
        raise grpc.aio.AioRpcError(
            grpc.StatusCode.UNAVAILABLE,
            grpc.aio.Metadata(),
            grpc.aio.Metadata(),
            details=f"the channel to instance {link.instance_id} closed during the call",
        ) from None
