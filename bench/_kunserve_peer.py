"""Stage 1 of `llmesh bench kunserve_mechanism`'s activation measurement: a kvtransport
and a KVExchange in a child process, the receiving member of a two-stage group.

Commands come over a multiprocessing pipe (op id, name, args) and run concurrently;
every reply carries its op id. Arrival times are time.monotonic(), one clock for every
process on the host, so the parent computes one-way latencies directly.

    stage_in       receive micro-batches pp/<key>/s1/0 .. n-1 in order, as a
                   StageRunner does (the next ones posted ahead); their arrival times
    kv_receive     KVExchange.receive of every transfer of a round, each written into
                   this member's KV pool at its blocks; (first, last arrival, errors)
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from typing import Any

from bench._peer_process import PeerProcess

RECV_TIMEOUT_S = 120.0
PREFETCH = 2  # micro-batches posted ahead, as StageRunner's prefetch


def _serve(conn, pool_shape: tuple[int, ...]) -> None:
    asyncio.run(_Stage(conn, pool_shape).run())


class _Stage:
    def __init__(self, conn, pool_shape: tuple[int, ...]) -> None:
        self._conn = conn
        self._pool_shape = pool_shape  # (layers, 2, blocks, block_size, kv heads, head dim)
        self._send_lock = threading.Lock()

    async def run(self) -> None:
        import torch

        from kvtransport import TransportConfig, make_transport
        from services.worker.kunserve.exchange import KVExchange

        torch.set_num_threads(1)
        self._pool = torch.zeros(self._pool_shape)
        self._transport = make_transport(TransportConfig())  # a worker's defaults
        await self._transport.start()
        self._exchange = KVExchange(self._transport, RECV_TIMEOUT_S)
        self._reply(0, self._transport.address)
        loop = asyncio.get_running_loop()
        tasks = set()
        while True:
            message = await loop.run_in_executor(None, self._conn.recv)
            if message is None:
                break
            task = loop.create_task(self._execute(*message))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await self._exchange.close()
        await self._transport.close()

    def _reply(self, op_id: int, result: Any) -> None:
        with self._send_lock:
            self._conn.send((op_id, result))

    async def _execute(self, op_id: int, op: str, args: tuple) -> None:
        try:
            result = await getattr(self, f"_op_{op}")(*args)
        except Exception as exc:  # reported to the parent, which fails the benchmark
            result = ("error", f"{type(exc).__name__}: {exc}")
        self._reply(op_id, result)

    async def _op_stage_in(self, link_prefix: str, count: int) -> list[float]:
        """Arrival times of micro-batches link_prefix/0 .. count-1."""

        def post(seq: int) -> asyncio.Future:
            return asyncio.ensure_future(
                self._transport.recv(f"{link_prefix}/{seq}", timeout=RECV_TIMEOUT_S)
            )

        pending = collections.deque(post(seq) for seq in range(min(PREFETCH, count)))
        done_at = []
        for seq in range(count):
            received = await pending.popleft()
            done_at.append(time.monotonic())
            if seq + PREFETCH < count:
                pending.append(post(seq + PREFETCH))
            self._transport.release(received)
        return done_at

    async def _op_kv_receive(self, specs: list[tuple]) -> tuple[float, float, list[str]]:
        """Receive a round of KV transfers as a member does at a drop; (first, last
        arrival, errors)."""
        import torch

        from services.common.groups import KVTransferSpec
        from services.worker.kunserve.exchange import kv_pieces

        arrivals: list[float] = []
        errors: list[str] = []
        finished = asyncio.Event()
        num_left = len(specs)

        async def write(spec: KVTransferSpec, data: torch.Tensor) -> None:
            # As GroupMembership._write_slices: into the pool, a piece per thread hop.
            for piece in kv_pieces(spec, data):
                layer = self._pool[piece.layer - spec.layer_start]
                blocks = torch.tensor(piece.block_ids)
                await asyncio.to_thread(layer.index_copy_, 1, blocks, piece.data[0])

        def done(spec: KVTransferSpec, error: str) -> None:
            nonlocal num_left
            arrivals.append(time.monotonic())
            if error:
                errors.append(f"{spec.transfer_id}: {error}")
            num_left -= 1
            if num_left == 0:
                finished.set()

        for fields in specs:
            self._exchange.receive(KVTransferSpec(*fields), write, done)
        await finished.wait()
        return min(arrivals), max(arrivals), errors


class StagePeer(PeerProcess):
    """Parent-side handle of the child stage."""

    name = "benchmark stage peer"

    def __init__(self, pool_shape: tuple[int, ...]) -> None:
        super().__init__(_serve, pool_shape)
