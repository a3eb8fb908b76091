"""The parent-side handle of a child process driven over a pipe (the benchmarks'
bench/_transport_peer.py and bench/_kunserve_peer.py, and the two-process kvtransport
tests): commands go over a multiprocessing pipe as (op id, name, args),
replies come back as (op id, result) in any order; kill() by PID if anything goes wrong.

The child answers op 0 with its data-plane address once it serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

START_TIMEOUT_S = 120.0


class PeerProcess:
    name = "benchmark peer"  # in errors

    def __init__(self, target: Callable[..., None], *args: Any) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child_conn = context.Pipe()
        self.process = context.Process(target=target, args=(child_conn, *args))
        self.process.start()
        child_conn.close()
        self._lock = threading.Lock()
        self._replies: dict[int, Any] = {}
        self._next_op_id = 1
        try:
            self.address: bytes = self._address_of(self._wait(0, START_TIMEOUT_S))
        except BaseException:
            self.kill()
            raise

    def _address_of(self, ready: Any) -> bytes:
        """The data-plane address in the child's op-0 reply (here: the reply itself)."""
        return ready

    def request(self, op: str, *args: Any) -> int:
        op_id = self._next_op_id
        self._next_op_id += 1
        self._conn.send((op_id, op, args))
        return op_id

    async def reply(self, op_id: int, timeout: float = 300.0) -> Any:
        result = await asyncio.get_running_loop().run_in_executor(None, self._wait, op_id, timeout)
        return self._checked(result)

    async def call(self, op: str, *args: Any, timeout: float = 300.0) -> Any:
        return await self.reply(self.request(op, *args), timeout)

    def _checked(self, result: Any) -> Any:
        """A command's result; an ("error", why) reply raises (a test peer returns it)."""
        if isinstance(result, tuple) and result and result[0] == "error":
            raise RuntimeError(f"{self.name} failed: {result[1]}")
        return result

    def stop(self) -> None:
        if self.process.is_alive():
            with contextlib.suppress(OSError):
                self._conn.send(None)
            self.process.join(15)
        self.kill()
        self._conn.close()

    def kill(self) -> None:
        if self.process.is_alive():
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.join(10)

    def _wait(self, op_id: int, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        with self._lock:
            while op_id not in self._replies:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._conn.poll(remaining):
                    raise TimeoutError(f"{self.name}: no reply to op {op_id}")
                reply_id, result = self._conn.recv()
                self._replies[reply_id] = result
            return self._replies.pop(op_id)
