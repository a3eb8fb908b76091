"""Following a peer's grpc.health.v1 status until it is lost.

A kill -9 closes the peer's sockets, so a Watch stream fails at once; a hung or
partitioned peer is caught by channel keepalive. A Watch can also end for benign
reasons (a GOAWAY, its deadline), so a failure is confirmed with a Check before the
peer counts as lost. A peer that turns NOT_SERVING (graceful shutdown) is lost too.
Used by the gateway (its workers) and by KunServe group members (each other).
"""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.grpc_client import check_health

_SERVING = health_pb2.HealthCheckResponse.SERVING


async def watch_until_lost(
    channel: grpc.aio.Channel, address: str, service: str, rotate_s: float
) -> str:
    """Returns why the peer at `address` counts as lost (never returns while it lives)."""
    health = health_pb2_grpc.HealthStub(channel)
    while True:
        reason = await _watch_once(health, service, rotate_s)
        if reason is None:
            continue  # the stream's deadline passed: re-open it
        if not reason.startswith("health status") and await check_health(
            address, service, timeout=1.0
        ):
            await asyncio.sleep(0.1)
            continue  # a benign stream end; the peer still answers
        return reason


async def _watch_once(health, service: str, rotate_s: float) -> str | None:
    """Follow one Watch stream; the reason it ended, or None for a deadline rotation."""
    call = health.Watch(health_pb2.HealthCheckRequest(service=service), timeout=rotate_s)
    try:
        async for reply in call:
            if reply.status != _SERVING:
                name = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
                return f"health status {name}"
        return "health watch ended"
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            return None
        return f"health watch failed: {exc.code().name}"
    finally:
        call.cancel()
