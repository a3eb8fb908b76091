"""The ASGI response of a generation request: run the plan, answer JSON or SSE.

    placement fails        -> the error's status (429 + Retry-After, 503, ...)
    stream: false          -> one JSON object once every choice finished
    stream: true           -> `data: {chunk}` per engine output batch per choice,
                              `data: {usage}` (stream_options.include_usage),
                              `data: [DONE]`; a choice failing mid-stream sends
                              `data: {"error": ...}` before [DONE]

The client going away (an `http.disconnect` on receive) cancels the work, which aborts
every choice on its worker: its KV blocks are freed, not left to finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send

from gateway.http_api.errors import APIError
from gateway.http_api.responses import CompleteResponse, StreamChunks
from gateway.http_api.runner import PlanRun
from services.common.logging import get_logger

log = get_logger(__name__)

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # proxies: do not buffer the stream
]


def _event(payload: dict | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class GenerationResponse:
    def __init__(self, run: PlanRun) -> None:
        self._run = run
        self._is_sent = False  # the last byte went out (uvicorn then reports a disconnect)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_tracked(message) -> None:
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                self._is_sent = True

        work = asyncio.ensure_future(self._respond(scope, receive, send_tracked))
        watch = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not work.done() and not self._is_sent:
                log.info("http_client_disconnected", response_id=self._run.plan.response_id)
                work.cancel()
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch
            with contextlib.suppress(asyncio.CancelledError):
                await work

    async def _respond(self, scope: Scope, receive: Receive, send: Send) -> None:
        run = self._run
        try:
            await run.start()
        except APIError as exc:
            await exc.response()(scope, receive, send)
            return
        try:
            created = int(time.time())
            if run.plan.stream:
                await self._stream(send, created)
            else:
                await self._complete(scope, receive, send, created)
        finally:
            await run.close()

    async def _complete(self, scope: Scope, receive: Receive, send: Send, created: int) -> None:
        response = CompleteResponse(self._run, created)
        async for event in self._run.events():
            if event.error is not None:
                await event.error.response()(scope, receive, send)
                return
            response.add(event)
        await JSONResponse(response.body())(scope, receive, send)

    async def _stream(self, send: Send, created: int) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        chunks = StreamChunks(self._run, created)
        failed = False
        async for event in self._run.events():
            if event.error is not None:
                await send({"type": "http.response.body", "body": _event(event.error.body()), "more_body": True})  # fmt: skip
                failed = True
                break
            await send({"type": "http.response.body", "body": _event(chunks.chunk(event)), "more_body": True})  # fmt: skip
        tail = b"" if failed or not self._run.plan.include_usage else _event(chunks.usage_chunk())
        await send({"type": "http.response.body", "body": tail + _event("[DONE]"), "more_body": False})  # fmt: skip
