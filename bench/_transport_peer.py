"""The receiving side of `llmesh bench transport`: a kvtransport in a child process.

Commands arrive over a multiprocessing pipe and run concurrently; every reply carries
the command's id. Completion times are time.monotonic(), one clock for every process on
the host, so the parent computes one-way latencies and end-to-end throughput directly.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from bench._peer_process import PeerProcess

RECV_TIMEOUT_S = 60.0


def _serve(conn, config_kwargs: dict) -> None:
    asyncio.run(_Server(conn, config_kwargs).run())


class _Server:
    def __init__(self, conn, config_kwargs: dict) -> None:
        self._conn = conn
        self._config_kwargs = config_kwargs
        self._send_lock = threading.Lock()
        self._buffers: dict[tuple[int, int], Any] = {}
        self._sinks: dict[str, asyncio.Event] = {}
        self._is_polling = False

    async def run(self) -> None:
        from kvtransport import TransportConfig, make_transport

        self._transport = make_transport(TransportConfig(**self._config_kwargs))
        await self._transport.start()
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
        await self._transport.close()

    def _reply(self, op_id: int, result: Any) -> None:
        with self._send_lock:
            self._conn.send((op_id, result))

    async def _execute(self, op_id: int, op: str, args: tuple) -> None:
        try:
            result = await getattr(self, f"_op_{op}")(op_id, *args)
        except Exception as exc:  # reported to the parent, which fails the benchmark
            result = ("error", f"{type(exc).__name__}: {exc}")
        self._reply(op_id, result)

    def _buffer(self, nbytes: int, slot: int):
        from kvtransport.tensors import huge_page_empty

        key = (nbytes, slot)
        if key not in self._buffers:  # reused across runs (like perftest's), on huge pages
            self._buffers[key] = huge_page_empty(nbytes).fill_(1)
        return self._buffers[key]

    async def _op_expect(self, op_id: int, transfers: list[tuple[str, int]]) -> dict:
        """Post receives into reused buffers, say 'ready', then report completion times."""
        done_at: dict[str, float] = {}

        async def receive(transfer_id: str, nbytes: int, slot: int) -> None:
            buffer = self._buffer(nbytes, slot)
            await self._transport.recv(transfer_id, into=[buffer], timeout=RECV_TIMEOUT_S)
            done_at[transfer_id] = time.monotonic()

        tasks = [
            asyncio.create_task(receive(tid, nbytes, slot))
            for slot, (tid, nbytes) in enumerate(transfers)
        ]
        await asyncio.sleep(0)  # every recv() has registered its transfer id
        self._reply(-op_id, "ready")
        await asyncio.gather(*tasks)
        return done_at

    async def _op_stream(
        self, op_id: int, prefix: str, count: int, nbytes: int, num_slots: int
    ) -> list[float]:
        """Receive prefix-0 .. prefix-(count-1), num_slots posted at a time (transfer i
        into buffer i % num_slots, posted once transfer i - num_slots is in); arrival
        times in transfer order."""
        done_at = [0.0] * count

        async def lane(slot: int) -> None:
            buffer = self._buffer(nbytes, slot)
            for index in range(slot, count, num_slots):
                await self._transport.recv(
                    f"{prefix}-{index}", into=[buffer], timeout=RECV_TIMEOUT_S
                )
                done_at[index] = time.monotonic()

        tasks = [asyncio.create_task(lane(slot)) for slot in range(min(num_slots, count))]
        await asyncio.sleep(0)  # the first recv of every lane is registered
        self._reply(-op_id, "ready")
        await asyncio.gather(*tasks)
        return done_at

    async def _op_activations(self, op_id: int, prefix: str, count: int) -> list[float]:
        """Receive activations prefix-0 .. prefix-(count-1) in order; their arrival times."""
        done_at = []
        for index in range(count):
            await self._transport.recv(f"{prefix}-{index}", timeout=RECV_TIMEOUT_S)
            done_at.append(time.monotonic())
        return done_at

    async def _op_poll(self, op_id: int, is_on: bool) -> bool:
        """While on, keep this event loop turning instead of asleep in epoll: the idle
        latency of a host where waking a process costs nothing (the loop a busy worker
        runs anyway), for what a faster machine measures as idle."""
        if is_on and not self._is_polling:
            self._is_polling = True
            self._poller = asyncio.get_running_loop().create_task(self._poll())
        elif not is_on and self._is_polling:
            self._is_polling = False
            await self._poller
        return True

    async def _poll(self) -> None:
        while self._is_polling:
            await asyncio.sleep(0)

    async def _op_sink(self, op_id: int, prefix: str, nbytes: int) -> int:
        """Receive prefix-0, prefix-1, ... until stop_sink; the number received."""
        from kvtransport import TransferCancelled

        stop = self._sinks[prefix] = asyncio.Event()
        buffer = self._buffer(nbytes, -1)
        count = 0
        while not stop.is_set():
            try:
                await self._transport.recv(
                    f"{prefix}-{count}", into=[buffer], timeout=RECV_TIMEOUT_S
                )
            except TransferCancelled:
                break
            count += 1
        return count

    async def _op_stop_sink(self, op_id: int, prefix: str, next_index: int) -> bool:
        self._sinks[prefix].set()
        return await self._transport.cancel_recv(f"{prefix}-{next_index}")


class TransportPeer(PeerProcess):
    """Parent-side handle of the child."""

    def __init__(self, **config_kwargs: Any) -> None:
        super().__init__(_serve, config_kwargs)

    async def ready(self, op_id: int) -> None:
        """For `expect`: wait until the child's receives are posted."""
        await self.reply(-op_id)
