"""OpenTelemetry setup and W3C trace-context propagation.

No exporter by default (spans are created but dropped); OTLP/gRPC export when an
endpoint is configured (each service config's `otlp_endpoint`, e.g.
`LLMESH_WORKER_OTLP_ENDPOINT`), and an in-memory exporter for tests. Trace context
travels as `traceparent`/`tracestate` in gRPC metadata and in plain dicts (data-plane
control messages, RequestState).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagate import extract, inject
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter

_provider: TracerProvider | None = None


def setup_tracing(
    service: str,
    otlp_endpoint: str | None = None,
    exporter: SpanExporter | None = None,
) -> TracerProvider:
    """Install the process-wide tracer provider for `service` (idempotent per process)."""
    global _provider
    if _provider is not None:
        return _provider
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    elif otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint, insecure=True))
        )
    trace.set_tracer_provider(provider)
    _provider = provider
    return provider


def shutdown_tracing() -> None:
    if _provider is not None:
        _provider.shutdown()


def get_tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


def context_to_dict(ctx: otel_context.Context | None = None) -> dict[str, str]:
    """The W3C headers (traceparent, tracestate) of ctx or the current context."""
    carrier: dict[str, str] = {}
    inject(carrier, context=ctx)
    return carrier


def context_from_dict(carrier: Mapping[str, str] | None) -> otel_context.Context:
    return extract(dict(carrier or {}))


def context_from_metadata(
    metadata: Iterable[tuple[str, str | bytes]] | None,
) -> otel_context.Context:
    carrier = {k: v for k, v in (metadata or ()) if isinstance(v, str)}
    return extract(carrier)
