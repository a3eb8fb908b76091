"""gateway.workers: a call in flight on a worker's channel when the channel closes
(the worker was found lost) ends as UNAVAILABLE, not as a cancellation of its caller."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from gateway.workers import WorkerPool
from protos import worker_pb2_grpc


class SilentWorker(worker_pb2_grpc.WorkerServicer):
    """Answers no Rehome: the call stays in flight."""

    def __init__(self) -> None:
        self.called = asyncio.Event()

    async def Rehome(self, request, context):
        self.called.set()
        await asyncio.sleep(3600)


async def test_a_call_whose_channel_closes_ends_unavailable_and_the_caller_goes_on():
    worker = SilentWorker()
    server = grpc.aio.server()
    worker_pb2_grpc.add_WorkerServicer_to_server(worker, server)
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    await server.start()
    pool = WorkerPool(
        lambda instance_id, reason: None,
        submit_timeout_s=60.0,
        abort_timeout_s=1.0,
        watch_rotate_s=60.0,
    )
    try:
        call = asyncio.create_task(pool.rehome("w", address, "r", "127.0.0.1:1", 0))
        await worker.called.wait()
        await pool.link("w", address).channel.close()  # as when its health watch fails
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await call
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "the channel to instance w closed during the call" in ended.value.details()
        assert not call.cancelled()
    finally:
        await pool.close()
        await server.stop(0)
