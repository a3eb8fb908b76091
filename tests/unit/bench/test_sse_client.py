"""The bench's lean SSE client against a real uvicorn server (the gateway's HttpServer)."""

from __future__ import annotations

import json

import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from bench._sse_client import HTTPStatusError, SSEConnection
from gateway.http_api.server import HttpServer


async def events(request):
    body = await request.json()

    async def stream():
        for i in range(body["n"]):
            yield f"data: {json.dumps({'i': i})}\n\n".encode()
        yield b": a comment line\n\ndata: [DONE]\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream")


async def refuse(request):
    return JSONResponse({"error": {"message": "no"}}, status_code=400)


@pytest.fixture
async def address():
    app = Starlette(
        routes=[Route("/events", events, methods=["POST"]), Route("/refuse", refuse, methods=["POST"])]
    )  # fmt: skip
    server = HttpServer(app, "127.0.0.1:0", grace_s=0)
    await server.start()
    yield server.address
    await server.stop()


async def test_events_in_order_over_one_keep_alive_connection(address):
    connection = await SSEConnection.open(address)
    try:
        for n in (3, 0, 5):  # the same connection, request after request
            got = [e async for e in connection.post_events("/events", {"n": n})]
            assert got == [{"i": i} for i in range(n)]
    finally:
        await connection.close()


async def test_an_error_status_raises_with_the_body(address):
    connection = await SSEConnection.open(address)
    try:
        with pytest.raises(HTTPStatusError) as info:
            _ = [e async for e in connection.post_events("/refuse", {})]
        assert str(info.value) == 'HTTP 400: {"error":{"message":"no"}}'
    finally:
        await connection.close()
