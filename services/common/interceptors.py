"""gRPC interceptors, one concern each.

Server side:
- TraceContextServerInterceptor: continues the caller's W3C trace context.
- ErrorMappingServerInterceptor: request bytes that do not parse as the request type
  are INVALID_ARGUMENT naming the type (gRPC itself answers UNKNOWN); a `ServiceError`
  (services.common.errors) escaping a handler becomes its status code, a ValueError
  becomes INVALID_ARGUMENT, both with the message as details, cut to
  MAX_DETAILS_BYTES (never an opaque UNKNOWN); a NotImplementedError (a generated
  servicer's default body) becomes UNIMPLEMENTED; other exceptions are logged with the
  method name and become INTERNAL.
Client side:
- TraceContextClientInterceptor: puts the current trace context into metadata.
"""

from __future__ import annotations

import inspect

import grpc
from opentelemetry import context as otel_context

from services.common.errors import ServiceError
from services.common.logging import get_logger
from services.common.tracing import context_from_metadata, context_to_dict

log = get_logger(__name__)


class TraceContextServerInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        parent = context_from_metadata(handler_call_details.invocation_metadata)
        return _wrap_handler(handler, lambda behavior: _with_context(behavior, parent))


class ErrorMappingServerInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        handler = _decode_leniently(handler)
        return _wrap_handler(handler, lambda behavior: _map_errors(behavior, method))


class _Undecodable:
    """Stands in for a request whose bytes did not parse; the handler wrapper turns it
    into INVALID_ARGUMENT (a deserializer that raises makes gRPC answer UNKNOWN)."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _decode_leniently(handler):
    deserialize = handler.request_deserializer
    if deserialize is None:
        return handler

    def decode(data: bytes):
        try:
            return deserialize(data)
        except Exception as exc:  # noqa: BLE001 - reported to the caller as bad input
            return _Undecodable(exc)

    return handler._replace(request_deserializer=decode)


def _checked(request):
    if isinstance(request, _Undecodable):
        raise ValueError(f"the request is not a valid message: {request.error}")
    return request


async def _checked_stream(request_iterator):
    async for request in request_iterator:
        yield _checked(request)


def _wrap_handler(handler, wrap):
    if handler.unary_unary:
        return handler._replace(unary_unary=wrap(handler.unary_unary))
    if handler.unary_stream:
        return handler._replace(unary_stream=wrap(handler.unary_stream))
    if handler.stream_unary:
        return handler._replace(stream_unary=wrap(handler.stream_unary))
    if handler.stream_stream:
        return handler._replace(stream_stream=wrap(handler.stream_stream))
    return handler


def _with_context(behavior, parent):
    if inspect.isasyncgenfunction(behavior):

        async def gen(request, context):
            token = otel_context.attach(parent)
            try:
                async for item in behavior(request, context):
                    yield item
            finally:
                otel_context.detach(token)

        return gen

    async def call(request, context):
        token = otel_context.attach(parent)
        try:
            return await behavior(request, context)
        finally:
            otel_context.detach(token)

    return call


# Status details travel in the trailers, percent-encoded (a non-ASCII byte takes 3),
# which a client refuses past its metadata limit (8 KiB by default): it would see
# RESOURCE_EXHAUSTED instead of the real status. Details echoing a huge id are cut to
# this many bytes of UTF-8.
MAX_DETAILS_BYTES = 1024


def _capped(details: str) -> str:
    encoded = details.encode("utf-8", errors="replace")
    if len(encoded) <= MAX_DETAILS_BYTES:
        return details
    head = encoded[: MAX_DETAILS_BYTES - 48].decode("utf-8", errors="ignore")
    return f"{head}... ({len(details)} characters in all)"


async def _abort_for(exc: Exception, context, method: str):
    if isinstance(exc, ServiceError):
        await context.abort(exc.code, _capped(str(exc)), exc.trailing_metadata())
    if isinstance(exc, ValueError):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _capped(str(exc)))
    if isinstance(exc, NotImplementedError):  # a generated servicer's unimplemented RPC
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented")
    log.exception("rpc_failed", method=method)
    await context.abort(
        grpc.StatusCode.INTERNAL,
        _capped(f"{method}: internal error: {type(exc).__name__}: {exc}"),
    )


def _checked_request(request):
    """The request (or a stream of them) with undecodable ones raising ValueError."""
    if hasattr(request, "__aiter__") and not isinstance(request, _Undecodable):
        return _checked_stream(request)
    return _checked(request)


def _map_errors(behavior, method):
    if inspect.isasyncgenfunction(behavior):

        async def gen(request, context):
            try:
                async for item in behavior(_checked_request(request), context):
                    yield item
            except (grpc.aio.AbortError, grpc.aio.AioRpcError):
                raise
            except Exception as exc:  # noqa: BLE001 - mapped to a status below
                await _abort_for(exc, context, method)

        return gen

    async def call(request, context):
        try:
            return await behavior(_checked_request(request), context)
        except (grpc.aio.AbortError, grpc.aio.AioRpcError):
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to a status below
            await _abort_for(exc, context, method)

    return call


class _TraceClientBase:
    @staticmethod
    def _details(client_call_details):
        metadata = list(client_call_details.metadata or [])
        keys = {k for k, _ in metadata}
        metadata.extend((k, v) for k, v in context_to_dict().items() if k not in keys)
        return (
            client_call_details._replace(metadata=metadata)
            if hasattr(client_call_details, "_replace")
            else grpc.aio.ClientCallDetails(
                client_call_details.method,
                client_call_details.timeout,
                metadata,
                client_call_details.credentials,
                client_call_details.wait_for_ready,
            )
        )


class TraceUnaryUnary(_TraceClientBase, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


class TraceUnaryStream(_TraceClientBase, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


class TraceStreamUnary(_TraceClientBase, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return await continuation(self._details(client_call_details), request_iterator)


class TraceStreamStream(_TraceClientBase, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return await continuation(self._details(client_call_details), request_iterator)


def default_server_interceptors() -> list[grpc.aio.ServerInterceptor]:
    return [TraceContextServerInterceptor(), ErrorMappingServerInterceptor()]


def default_client_interceptors() -> list:
    return [TraceUnaryUnary(), TraceUnaryStream(), TraceStreamUnary(), TraceStreamStream()]
