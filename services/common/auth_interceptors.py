"""gRPC interceptors that enforce who may call: cluster members inside, API keys at the edge.

Server side, installed by services.common.grpc_server on every server, first in line:
- ClusterAuthServerInterceptor: every method needs a valid `x-llmesh-cluster-auth`
  (services.common.cluster_auth), except grpc.health.v1, server reflection and the
  services a server names as public (the gateway's client API, which its own API-key
  interceptor guards). A refused call gets UNAUTHENTICATED before any handler runs.
Client side: Metadata{UnaryUnary,...} (aio) and SyncMetadata (blocking channels) add
metadata to every call: `cluster_signature` on every internal channel
(services.common.grpc_client), `bearer` for the SDK's API key (gateway.client).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import grpc

from services.common import cluster_auth
from services.common.logging import get_logger

log = get_logger(__name__)

MetadataFor = Callable[[str], list[tuple[str, str]]]  # a call's method -> metadata to add

# Open on every server: health checks (load balancers, HEALTHCHECK) and reflection
# (the schema is public: protos/).
OPEN_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection")


def service_of(method: str) -> str:
    """ "llmesh.v1.Worker" for "/llmesh.v1.Worker/Submit"."""
    return method.lstrip("/").split("/", 1)[0]


def metadata_value(metadata, key: str) -> str | None:
    for item_key, value in metadata or ():
        if item_key == key:
            return value.decode() if isinstance(value, bytes) else value
    return None


def refusing_handler(handler, code: grpc.StatusCode, details: str):
    """`handler` with its behaviour replaced by an abort(code, details)."""

    async def abort_unary(request, context):
        await context.abort(code, details)

    async def abort_stream(request, context):
        await context.abort(code, details)
        yield  # pragma: no cover - makes this an async generator, like the handler

    for kind in ("unary_unary", "stream_unary", "unary_stream", "stream_stream"):
        if getattr(handler, kind):
            replacement = abort_stream if kind.endswith("_stream") else abort_unary
            return handler._replace(**{kind: replacement})
    return handler


class GuardServerInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls to `guarded(service)` methods for which `check(method, metadata)`
    returns a reason ("" = allowed); the reason goes to the log, `code` to the caller."""

    def __init__(
        self,
        guarded: Callable[[str], bool],
        check: Callable[[str, object], str],
        code: grpc.StatusCode,
        details: str,
    ) -> None:
        self._guarded = guarded
        self._check = check
        self._code = code
        self._details = details

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not self._guarded(service_of(method)):
            return handler
        reason = self._check(method, handler_call_details.invocation_metadata)
        if not reason:
            return handler
        log.warning("rpc_refused", method=method, reason=reason)
        return refusing_handler(handler, self._code, f"{method}: {self._details}: {reason}")


def cluster_auth_interceptor(public_services: Iterable[str] = ()) -> GuardServerInterceptor:
    """Every service but OPEN_SERVICES and `public_services` needs cluster credentials."""
    open_services = frozenset((*OPEN_SERVICES, *public_services))
    secret = cluster_auth.current().secret

    def check(method: str, metadata) -> str:
        value = metadata_value(metadata, cluster_auth.METADATA_KEY)
        return cluster_auth.verify(secret, method, value)

    return GuardServerInterceptor(
        lambda service: service not in open_services,
        check,
        grpc.StatusCode.UNAUTHENTICATED,
        "internal RPC: only cluster members may call it",
    )


def _with_metadata(details, extra: MetadataFor):
    method = details.method.decode() if isinstance(details.method, bytes) else details.method
    added = extra(method)
    keys = {k for k, _ in added}
    metadata = [(k, v) for k, v in (details.metadata or ()) if k not in keys] + added
    if hasattr(details, "_replace"):
        return details._replace(metadata=metadata)
    return grpc.aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )


class _AioMetadata:
    def __init__(self, extra: MetadataFor) -> None:
        self._extra = extra


class MetadataUnaryUnary(_AioMetadata, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(_with_metadata(details, self._extra), request)


class MetadataUnaryStream(_AioMetadata, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(_with_metadata(details, self._extra), request)


class MetadataStreamUnary(_AioMetadata, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, details, request_iterator):
        return await continuation(_with_metadata(details, self._extra), request_iterator)


class MetadataStreamStream(_AioMetadata, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, details, request_iterator):
        return await continuation(_with_metadata(details, self._extra), request_iterator)


def aio_metadata_interceptors(extra: MetadataFor) -> list:
    """aio client interceptors adding `extra(method)` to every call's metadata."""
    return [
        cls(extra)
        for cls in (
            MetadataUnaryUnary,
            MetadataUnaryStream,
            MetadataStreamUnary,
            MetadataStreamStream,
        )
    ]


class SyncMetadata(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """The same for a blocking channel (`grpc.intercept_channel(channel, SyncMetadata(f))`)."""

    def __init__(self, extra: MetadataFor) -> None:
        self._extra = extra

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(_with_metadata(details, self._extra), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(_with_metadata(details, self._extra), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(_with_metadata(details, self._extra), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(_with_metadata(details, self._extra), request_iterator)


def cluster_signature(secret: bytes) -> MetadataFor:
    """Metadata proving cluster membership for each call (cluster_auth.sign)."""
    return lambda method: [(cluster_auth.METADATA_KEY, cluster_auth.sign(secret, method))]


def bearer(token: str) -> MetadataFor:
    """`authorization: Bearer <token>` on every call (the gateway's API keys)."""
    return lambda method: [("authorization", f"Bearer {token}")]
