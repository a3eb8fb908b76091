"""A kvtransport in a child process, driven by commands over a pipe (for two-process tests).

The child runs one transport and executes commands concurrently; each command's reply
carries its id. Payloads are generated from a seed on both sides, so only digests cross
the pipe. Every PeerProcess is killed by PID when the test ends (see conftest.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import multiprocessing
import os
import signal
import threading
import time
from typing import Any

import torch

from tests.unit.kvtransport.helpers import pattern

START_TIMEOUT_S = 60.0


def payload(seed: int, nbytes: int) -> torch.Tensor:
    """Deterministic bytes, the same on both sides of a test (fast even for 256 MiB)."""
    return pattern(nbytes, salt=seed * 7919)


def digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().view(-1).view(torch.uint8).numpy()).hexdigest()


def _serve(conn, config_kwargs: dict) -> None:
    asyncio.run(_serve_async(conn, config_kwargs))


async def _serve_async(conn, config_kwargs: dict) -> None:
    from kvtransport import TrafficClass, TransportConfig, TransportError, make_transport

    transport = make_transport(TransportConfig(**config_kwargs))
    await transport.start()
    loop = asyncio.get_running_loop()
    send_lock = threading.Lock()
    handles: dict[str, Any] = {}
    tasks: set[asyncio.Task] = set()

    def reply(op_id: int, result: Any) -> None:
        with send_lock:
            conn.send((op_id, result))

    async def run(op: str, args: tuple) -> Any:
        if op == "recv":
            transfer_id, timeout = args
            received = await transport.recv(transfer_id, timeout=timeout)
            done_at = time.monotonic()  # one clock for every process on the host
            return {"digests": [digest(t) for t in received], "done_at": done_at}
        if op == "send":
            peer, transfer_id, seeds_and_sizes, traffic_class, pause_after_bytes = args
            tensors = [payload(seed, nbytes) for seed, nbytes in seeds_and_sizes]
            handle = await transport.send(peer, transfer_id, tensors, TrafficClass(traffic_class))
            handles[transfer_id] = handle
            if pause_after_bytes is None:
                await handle.wait()
                return handle.status.value
            while handle.num_bytes_sent < pause_after_bytes and not handle.is_finished:
                await asyncio.sleep(0.001)
            handle.pause()  # not awaited: chunks in flight may wait for the receiver
            return handle.status.value
        if op == "stats":
            return transport.stats()
        raise ValueError(f"unknown op {op!r}")

    async def execute(op_id: int, op: str, args: tuple) -> None:
        started = time.perf_counter()
        try:
            result = ("ok", await run(op, args))
        except TransportError as exc:
            result = ("error", type(exc).__name__, str(exc), time.perf_counter() - started)
        reply(op_id, result)

    reply(0, ("address", transport.address))
    while True:
        message = await loop.run_in_executor(None, conn.recv)
        if message is None:
            break
        task = loop.create_task(execute(*message))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await transport.close()


class PeerProcess:
    """Parent-side handle of a child transport."""

    def __init__(self, **config_kwargs: Any) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child_conn = context.Pipe()
        self.process = context.Process(target=_serve, args=(child_conn, config_kwargs))
        self.process.start()
        child_conn.close()
        self._lock = threading.Lock()
        self._replies: dict[int, Any] = {}
        self._next_op_id = 1
        try:
            _, address = self._wait_reply(0, START_TIMEOUT_S)
        except BaseException:
            self.kill()
            raise
        self.address: bytes = address

    def request(self, op: str, *args: Any) -> int:
        """Start a command in the child; collect its result with `reply`."""
        op_id = self._next_op_id
        self._next_op_id += 1
        self._conn.send((op_id, op, args))
        return op_id

    async def reply(self, op_id: int, timeout: float = 60.0) -> Any:
        return await asyncio.get_running_loop().run_in_executor(
            None, self._wait_reply, op_id, timeout
        )

    async def call(self, op: str, *args: Any, timeout: float = 60.0) -> Any:
        return await self.reply(self.request(op, *args), timeout)

    def kill(self) -> None:
        if self.process.is_alive():
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.join(10)

    def stop(self) -> None:
        """Ask the child to close its transport and exit; kill it if it does not."""
        if self.process.is_alive():
            with contextlib.suppress(OSError):
                self._conn.send(None)
            self.process.join(10)
        self.kill()
        self._conn.close()

    def _wait_reply(self, op_id: int, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        with self._lock:
            while op_id not in self._replies:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._conn.poll(remaining):
                    raise TimeoutError(f"no reply to op {op_id} within {timeout}s")
                reply_id, result = self._conn.recv()
                self._replies[reply_id] = result
            return self._replies.pop(op_id)
