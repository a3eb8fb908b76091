"""A kvtransport in a child process, driven by commands over a pipe (for two-process tests).

The child runs one transport and executes commands concurrently; each command's reply
carries its id. Payloads are generated from a seed on both sides, so only digests cross
the pipe. Every PeerProcess is killed by PID when the test ends (see conftest.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from typing import Any

import torch

from bench import _peer_process as bench_peer
from tests.unit.kvtransport.helpers import pattern


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


class PeerProcess(bench_peer.PeerProcess):
    """Parent-side handle of a child transport: results come back as the child sent
    them, ("ok", value) or ("error", kind, message, seconds), for the test to check."""

    name = "transport peer"

    def __init__(self, **config_kwargs: Any) -> None:
        super().__init__(_serve, config_kwargs)

    def _address_of(self, ready: Any) -> bytes:
        _, address = ready  # ("address", address)
        return address

    def _checked(self, result: Any) -> Any:
        return result

    async def reply(self, op_id: int, timeout: float = 60.0) -> Any:
        return await super().reply(op_id, timeout)

    async def call(self, op: str, *args: Any, timeout: float = 60.0) -> Any:
        return await super().call(op, *args, timeout=timeout)
