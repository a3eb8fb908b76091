"""What every service exports for observability: traces over OTLP and Prometheus metrics.

Nested in each service's config as `telemetry` (env `LLMESH_<SERVICE>_TELEMETRY_<FIELD>`),
and each field also follows the standard OpenTelemetry variable where one exists
(`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` / `OTEL_EXPORTER_OTLP_ENDPOINT`,
`OTEL_SERVICE_NAME`, `OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG`), so a
deployment that sets those for every container configures llmesh too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from services.common.config import ENV, flag_type, require

# OTEL_TRACES_SAMPLER values (the OpenTelemetry SDK's names) that llmesh accepts.
SAMPLERS = (
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
)


@dataclass(frozen=True)
class TelemetryConfig:
    """Traces and metrics of one service process."""

    # OTLP/gRPC trace collector, e.g. http://127.0.0.1:4317; empty = spans not exported.
    otlp_endpoint: str = field(
        default="",
        metadata={ENV: ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")},
    )
    # service.name of this process's spans; empty = llmesh-<service>.
    service_name: str = field(default="", metadata={ENV: "OTEL_SERVICE_NAME"})
    # Which traces are kept. parentbased_*: a request keeps its caller's decision, so one
    # request is sampled in every service or in none.
    trace_sampler: str = field(
        default="parentbased_traceidratio", metadata={ENV: "OTEL_TRACES_SAMPLER"}
    )
    # Share of new traces kept by the *traceidratio samplers (0 to 1).
    trace_sample_ratio: float = field(default=1.0, metadata={ENV: "OTEL_TRACES_SAMPLER_ARG"})
    # host:port of the Prometheus /metrics HTTP endpoint (port 0 = chosen by the OS,
    # written to the ready file); none = no endpoint and no metrics recorded.
    metrics_bind: str | None = "127.0.0.1:0"

    def __post_init__(self) -> None:
        require(
            self.trace_sampler in SAMPLERS,
            f"trace_sampler={self.trace_sampler!r} must be one of {', '.join(SAMPLERS)}",
        )
        require(
            0.0 <= self.trace_sample_ratio <= 1.0,
            f"trace_sample_ratio={self.trace_sample_ratio} must be between 0 and 1",
        )
        require(
            self.metrics_bind is None or ":" in self.metrics_bind,
            f"metrics_bind={self.metrics_bind!r} must be host:port or none",
        )

    @property
    def metrics_enabled(self) -> bool:
        return self.metrics_bind is not None


def add_telemetry_flags(parser) -> None:
    """The `telemetry.*` flags every service's argparse parser takes."""
    group = parser.add_argument_group(
        "telemetry (LLMESH_<SERVICE>_TELEMETRY_<FIELD>, or the OTEL_* variables)"
    )
    group.add_argument(
        "--otlp-endpoint",
        dest="telemetry.otlp_endpoint",
        help="OTLP/gRPC trace collector (http://host:4317); also $OTEL_EXPORTER_OTLP_ENDPOINT",
    )
    group.add_argument(
        "--trace-sample-ratio",
        dest="telemetry.trace_sample_ratio",
        type=flag_type(float, "trace_sample_ratio", "--trace-sample-ratio"),
        help="share of new traces kept (default 1); also $OTEL_TRACES_SAMPLER_ARG",
    )
    group.add_argument(
        "--metrics-bind",
        dest="telemetry.metrics_bind",
        type=flag_type(str | None, "metrics_bind", "--metrics-bind"),
        help="host:port of the Prometheus /metrics endpoint (port 0 = any free port, the "
        "default; none = off)",
    )
