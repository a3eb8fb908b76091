"""Prometheus metrics: the shared vocabulary and each service's /metrics endpoint.

Names follow vLLM's where the meaning is the same, with the `llmesh:` prefix instead
of `vllm:` (so vLLM's dashboards port by a rename); llmesh's own (migrations, KunServe,
dispatch) share the prefix. Labels are bounded: `model_name`, `instance_id` (not
`instance`, which Prometheus itself sets to the scrape target) and small enums; never
a request id.

Each service builds its metrics on its own `CollectorRegistry` (so in-process tests
do not share counters) and serves it with prometheus-client's HTTP server on
`TelemetryConfig.metrics_bind`; the bound address goes into the ready file.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable
from wsgiref.simple_server import WSGIRequestHandler, make_server

import prometheus_client
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

from services.common.addresses import advertised_address
from services.common.logging import get_logger

log = get_logger(__name__)
PREFIX = "llmesh:"

# Counters without their `_created` companion series (vLLM's exposition has none either).
prometheus_client.disable_created_metrics()

# Seconds; vLLM's TTFT buckets (also used for end-to-end and migration durations).
LATENCY_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0,
)  # fmt: skip
# Seconds; vLLM's inter-token latency buckets (also data-plane activations).
TOKEN_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075,
    0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
)  # fmt: skip
# Seconds; a migration's stop-and-copy downtime (milliseconds in the common case).
DOWNTIME_BUCKETS = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
)  # fmt: skip


class GaugeCollector(Collector):
    """Gauges read at scrape time from what the service already keeps (engine
    snapshots, the registry), so serving pays nothing for them.

    `read()` returns [(name, documentation, labels dict, value)]; a name's label keys
    must be the same in every row."""

    def __init__(self, read: Callable[[], Iterable[tuple[str, str, dict[str, str], float]]]):
        self._read = read

    def collect(self):
        families: dict[str, GaugeMetricFamily] = {}
        rows: list = []
        # read() walks structures the event loop owns; a walk that raced a change
        # (RuntimeError: changed size during iteration) is simply taken again.
        for _ in range(3):
            try:
                rows = list(self._read())
                break
            except RuntimeError:
                continue
            except Exception:  # noqa: BLE001 - a scrape must not fail on a racing shutdown
                log.warning("metrics_read_failed", exc_info=True)
                break
        for name, doc, labels, value in rows:
            family = families.get(name)
            if family is None:
                family = families[name] = GaugeMetricFamily(name, doc, labels=list(labels))
            family.add_metric(list(labels.values()), value)
        return list(families.values())


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args) -> None:  # noqa: A002 - the base's signature
        """Scrapes every few seconds would flood the service's log."""


class MetricsEndpoint:
    """/metrics of one registry over HTTP (prometheus-client's WSGI app, a daemon thread).

    Always the Prometheus text format 0.0.4: prometheus-client's OpenMetrics encoder
    (which a Prometheus server asks for first) rewrites the ':' of `llmesh:` names to
    '_' ("escaping=underscores"), so the series would not have the names dashboards use.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.address = ""
        self._server = None

    def start(self, bind: str) -> str:
        """Serve /metrics on bind (host:port, port 0 = any free port); returns host:port."""
        host, port = bind.rsplit(":", 1)
        app = prometheus_client.make_wsgi_app(self.registry)

        def text_format(environ, start_response):
            environ.pop("HTTP_ACCEPT", None)  # no Accept: the text format
            return app(environ, start_response)

        self._server = make_server(
            host, int(port), text_format, ThreadingWSGIServer, handler_class=_QuietHandler
        )
        threading.Thread(
            target=self._server.serve_forever, name="metrics-http", daemon=True
        ).start()
        # What scrapers use: a wildcard bind is reported as this host's name.
        self.address = advertised_address(f"{host}:{self._server.server_port}")
        log.info("metrics_endpoint_started", address=self.address)
        return self.address

    def stop(self) -> None:
        if self._server is not None:
            with contextlib.suppress(OSError):
                self._server.shutdown()
                self._server.server_close()
            self._server = None


def start_metrics(registry: CollectorRegistry | None, bind: str | None) -> MetricsEndpoint | None:
    """The endpoint for `registry` on `bind`, or None when metrics are off."""
    if registry is None or bind is None:
        return None
    endpoint = MetricsEndpoint(registry)
    endpoint.start(bind)
    return endpoint
