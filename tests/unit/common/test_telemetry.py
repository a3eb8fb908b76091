"""Telemetry configuration (LLMESH_* and the standard OTEL_* variables), the sampler it
names, and the /metrics endpoint."""

from __future__ import annotations

import urllib.request

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry, Counter

from services.common.config import ConfigError, load_config
from services.common.metrics import GaugeCollector, MetricsEndpoint, start_metrics
from services.common.telemetry_config import TelemetryConfig
from services.common.tracing import make_sampler
from services.worker.config import WorkerConfig

# What a Prometheus server sends: OpenMetrics first.
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
    "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)


def _worker(environ: dict[str, str], **overrides) -> TelemetryConfig:
    return load_config(WorkerConfig, "WORKER", overrides, environ=environ).telemetry


def test_the_standard_otel_variables_configure_every_service():
    telemetry = _worker(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317",
            "OTEL_SERVICE_NAME": "edge-worker",
            "OTEL_TRACES_SAMPLER": "parentbased_always_off",
            "OTEL_TRACES_SAMPLER_ARG": "0.25",
        }
    )
    assert telemetry == TelemetryConfig(
        otlp_endpoint="http://collector:4317",
        service_name="edge-worker",
        trace_sampler="parentbased_always_off",
        trace_sample_ratio=0.25,
    )


def test_the_traces_endpoint_wins_over_the_generic_one_and_llmesh_over_both():
    both = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://generic:4317",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://traces:4317",
    }
    assert _worker(both).otlp_endpoint == "http://traces:4317"
    mine = {**both, "LLMESH_WORKER_TELEMETRY_OTLP_ENDPOINT": "http://mine:4317"}
    assert _worker(mine).otlp_endpoint == "http://mine:4317"
    flag = _worker(mine, **{"telemetry.otlp_endpoint": "http://flag:4317"})
    assert flag.otlp_endpoint == "http://flag:4317"


def test_metrics_endpoint_can_be_turned_off():
    telemetry = _worker({"LLMESH_WORKER_TELEMETRY_METRICS_BIND": "none"})
    assert telemetry.metrics_bind is None and not telemetry.metrics_enabled
    assert start_metrics(CollectorRegistry(), telemetry.metrics_bind) is None


@pytest.mark.parametrize(
    ("environ", "field"),
    [
        ({"OTEL_TRACES_SAMPLER": "jaeger_remote"}, "trace_sampler='jaeger_remote'"),
        ({"OTEL_TRACES_SAMPLER_ARG": "1.5"}, "trace_sample_ratio=1.5"),
        ({"LLMESH_WORKER_TELEMETRY_METRICS_BIND": "9100"}, "metrics_bind='9100'"),
    ],
)
def test_bad_values_name_their_field(environ, field):
    with pytest.raises(ConfigError, match=field.replace("(", r"\(")):
        _worker(environ)


def _sampled(sampler, parent_sampled: bool | None) -> bool:
    """Whether a span is recorded under `sampler`, as a root or as the child of a
    (sampled or unsampled) parent."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=sampler)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    if parent_sampled is None:
        tracer.start_span("root").end()
    else:
        parent_provider = TracerProvider(
            sampler=make_sampler("always_on" if parent_sampled else "always_off", 1)
        )
        with parent_provider.get_tracer("p").start_as_current_span("parent"):
            tracer.start_span("child").end()
    return len(exporter.get_finished_spans()) == 1


def test_parent_based_sampling_keeps_a_request_whole():
    sampler = make_sampler("parentbased_traceidratio", 0.0)
    assert not _sampled(sampler, None)  # new traces: the ratio (none kept)
    assert _sampled(sampler, True)  # a sampled request stays sampled here
    assert not _sampled(sampler, False)
    assert _sampled(make_sampler("traceidratio", 1.0), None)
    assert not _sampled(make_sampler("always_off", 1.0), True)


def test_metrics_endpoint_serves_the_text_format_with_llmesh_names():
    registry = CollectorRegistry()
    Counter("llmesh:things", "Things.", ["model_name"], registry=registry).labels("tiny").inc(3)
    registry.register(GaugeCollector(lambda: [("llmesh:level", "A level.", {}, 7.5)]))
    endpoint = MetricsEndpoint(registry)
    address = endpoint.start("127.0.0.1:0")
    try:
        assert not address.endswith(":0")
        request = urllib.request.Request(
            f"http://{address}/metrics", headers={"Accept": PROMETHEUS_ACCEPT}
        )
        with urllib.request.urlopen(request, timeout=10) as reply:
            content_type = reply.headers["Content-Type"]
            body = reply.read().decode()
    finally:
        endpoint.stop()
    assert content_type.startswith("text/plain; version=0.0.4")
    assert 'llmesh:things_total{model_name="tiny"} 3.0' in body.splitlines()
    assert "llmesh:level 7.5" in body.splitlines()
    assert "_created" not in body


def test_gauge_collector_reads_again_when_a_walk_races_a_change():
    attempts = []

    def read():
        attempts.append(1)
        if len(attempts) < 3:
            raise RuntimeError("dictionary changed size during iteration")
        return [("llmesh:x", "X.", {"instance_id": "w"}, 1.0)]

    [family] = GaugeCollector(read).collect()
    assert [(s.name, s.labels, s.value) for s in family.samples] == [
        ("llmesh:x", {"instance_id": "w"}, 1.0)
    ]
    assert len(attempts) == 3
