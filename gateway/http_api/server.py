"""uvicorn serving the HTTP API inside the gateway's asyncio loop, next to gRPC.

Not `uvicorn.Server.serve()`: that installs its own SIGINT/SIGTERM handlers, and the
gateway's GrpcServer owns those. The socket is bound here (port 0 = chosen by the OS)
so the address is known before the ready file is written.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

import uvicorn

from services.common.addresses import advertised_address, split_host_port


class HttpServer:
    def __init__(self, app, bind: str, grace_s: float, tls: tuple[str, str] | None = None) -> None:
        """`tls`: (certificate, key) PEM paths to serve HTTPS instead of HTTP."""
        host, port = split_host_port(bind)
        bare = host.strip("[]")  # an IPv6 host comes in brackets
        family = socket.AF_INET6 if ":" in bare else socket.AF_INET
        try:
            self._socket = socket.create_server((bare, int(port)), family=family)
        except (OSError, ValueError) as exc:
            raise OSError(f"http_bind={bind!r}: cannot listen there: {exc}") from None
        self._socket.setblocking(False)
        # What clients use: a wildcard bind is reported as this host's name.
        self.address = advertised_address(f"{host}:{self._socket.getsockname()[1]}")
        config = uvicorn.Config(
            app,
            lifespan="off",
            log_config=None,
            log_level=logging.WARNING,
            access_log=False,
            timeout_graceful_shutdown=max(grace_s, 0.1),
            timeout_keep_alive=30,
            ssl_certfile=tls[0] if tls else None,
            ssl_keyfile=tls[1] if tls else None,
        )
        config.load()
        self._server = uvicorn.Server(config)
        self._server.lifespan = config.lifespan_class(config)
        self._main_loop: asyncio.Task | None = None

    async def start(self) -> None:
        try:
            await self._server.startup(sockets=[self._socket])
        except BaseException:
            self._socket.close()
            raise
        self._main_loop = asyncio.create_task(self._server.main_loop())

    async def stop(self) -> None:
        """Stop accepting, give open responses the grace period, then close them."""
        self._server.should_exit = True
        if self._main_loop is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._main_loop
            await self._server.shutdown(sockets=[self._socket])
        else:
            self._socket.close()
