"""OpenTelemetry setup and W3C trace-context propagation.

Every process installs a tracer provider, so spans (and the trace ids in the logs)
exist even when nothing is exported. With `TelemetryConfig.otlp_endpoint` (or the
standard `OTEL_EXPORTER_OTLP_ENDPOINT`) spans leave the process over OTLP/gRPC in
batches; the sampler follows `OTEL_TRACES_SAMPLER(_ARG)`, parent-based by default so a
request is kept or dropped as a whole across services. Tests pass an in-memory exporter.

Trace context travels as `traceparent`/`tracestate` in gRPC metadata (the interceptors)
and in plain dicts (data-plane control messages, RequestState.trace_context).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagate import extract, inject
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)

from services.common.telemetry_config import TelemetryConfig

_provider: TracerProvider | None = None


def make_sampler(name: str, ratio: float) -> Sampler:
    """The sampler an OTEL_TRACES_SAMPLER name (and its ratio) stands for."""
    root = {"always_on": ALWAYS_ON, "always_off": ALWAYS_OFF}.get(
        name.removeprefix("parentbased_")
    ) or TraceIdRatioBased(ratio)
    return ParentBased(root) if name.startswith("parentbased_") else root


def setup_tracing(
    service: str,
    config: TelemetryConfig | None = None,
    exporter: SpanExporter | None = None,
    instance_id: str = "",
) -> TracerProvider:
    """Install the process-wide tracer provider for `service` (idempotent per process).

    service: the default service.name (`config.service_name` wins when set);
    instance_id: service.instance.id, to tell the spans of several workers apart."""
    global _provider
    if _provider is not None:
        return _provider
    config = config or TelemetryConfig()
    attributes = {"service.name": config.service_name or service, "service.namespace": "llmesh"}
    if instance_id:
        attributes["service.instance.id"] = instance_id
    provider = TracerProvider(
        resource=Resource.create(attributes),
        sampler=make_sampler(config.trace_sampler, config.trace_sample_ratio),
    )
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    elif config.otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        endpoint = config.otlp_endpoint
        provider.add_span_processor(
            BatchSpanProcessor(
                OTLPSpanExporter(endpoint=endpoint, insecure=not endpoint.startswith("https://"))
            )
        )
    trace.set_tracer_provider(provider)
    _provider = provider
    return provider


def shutdown_tracing() -> None:
    """Export what is still batched, then stop (called as the process exits)."""
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
