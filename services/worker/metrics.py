"""The worker's Prometheus metrics (names: services/common/metrics.py).

Engine gauges (running, waiting, KV usage, preemptions) and data-plane bytes are read
at scrape time from the engine's latest snapshot and the transport's counters; events
(migrations, pipeline round trips) are recorded where they happen. Every series
carries `model_name` and `instance_id`.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from services.common.metrics import (
    DOWNTIME_BUCKETS,
    LATENCY_BUCKETS,
    PREFIX,
    TOKEN_LATENCY_BUCKETS,
)
from services.common.migration import MigrationMode
from services.worker.async_engine import EngineSnapshot


class _WorkerCollector(Collector):
    """Scrape-time series from the engine snapshot and the data plane's counters."""

    def __init__(self, labels: dict[str, str], read: Callable[[], tuple]) -> None:
        self._labels = labels
        self._read = read  # () -> (EngineSnapshot | None, bytes by class, group stage or -1)

    def collect(self):
        keys, values = list(self._labels), list(self._labels.values())
        try:
            snapshot, bytes_by_class, stage = self._read()
        except Exception:  # noqa: BLE001 - a scrape racing the shutdown gets nothing
            return []
        families = []

        def gauge(name: str, doc: str, value: float) -> None:
            family = GaugeMetricFamily(PREFIX + name, doc, labels=keys)
            family.add_metric(values, value)
            families.append(family)

        if snapshot is not None:
            stats = snapshot.stats
            gauge("num_requests_running", "Requests in the running batch.", stats.num_running)
            gauge("num_requests_waiting", "Requests waiting to be scheduled.", stats.num_waiting)
            gauge(
                "kv_cache_usage_perc",
                "KV-cache usage: 1 means every block is used.",
                stats.num_used_blocks / stats.num_total_blocks if stats.num_total_blocks else 0,
            )
            gauge("num_kv_blocks", "KV blocks of the engine's pool.", stats.num_total_blocks)
            preemptions = CounterMetricFamily(
                PREFIX + "num_preemptions", "Cumulative preemptions.", labels=keys
            )
            preemptions.add_metric(values, stats.num_preemptions)
            families.append(preemptions)
        gauge("kunserve_stage", "Stage in a KunServe group; -1 when alone.", stage)
        sent = CounterMetricFamily(
            PREFIX + "data_plane_bytes_sent",
            "Bytes of finished data-plane sends, by traffic class (activation, kv).",
            labels=[*keys, "traffic_class"],
        )
        for traffic_class, num_bytes in sorted(bytes_by_class.items()):
            sent.add_metric([*values, traffic_class], num_bytes)
        families.append(sent)
        return families


class WorkerMetrics:
    """Every metric of one worker process, on its own registry."""

    def __init__(self, instance_id: str, model_name: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.labels = {"model_name": model_name, "instance_id": instance_id}
        keys = list(self.labels)
        self.migrations = Counter(
            PREFIX + "migrations",
            "Outgoing migrations by mode and outcome (committed or aborted).",
            [*keys, "mode", "outcome"],
            registry=self.registry,
        )
        self.migration_downtime = Histogram(
            PREFIX + "migration_downtime_seconds",
            "Committed migrations: time the request made no progress (stop-and-copy).",
            [*keys, "mode"],
            buckets=DOWNTIME_BUCKETS,
            registry=self.registry,
        )
        self.migration_duration = Histogram(
            PREFIX + "migration_duration_seconds",
            "Outgoing migrations, start to end, whatever their outcome.",
            [*keys, "mode"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.migration_bytes = Counter(
            PREFIX + "migration_bytes",
            "KV bytes sent by outgoing migrations.",
            [*keys, "mode"],
            registry=self.registry,
        )
        self.activation_round_trip = Histogram(
            PREFIX + "activation_latency_seconds",
            "KunServe stage 0: a micro-batch's activations out to its sampled tokens back.",
            keys,
            buckets=TOKEN_LATENCY_BUCKETS,
            registry=self.registry,
        )
        # Every label set exists from the start: dashboards show 0 rather than nothing,
        # and the first migration is an increase that rate() sees.
        self.activation_round_trip.labels(**self.labels)
        for mode in MigrationMode:
            for outcome in ("committed", "aborted"):
                self.migrations.labels(**self.labels, mode=mode.value, outcome=outcome)
            for metric in (self.migration_downtime, self.migration_duration, self.migration_bytes):
                metric.labels(**self.labels, mode=mode.value)

    def watch(self, read: Callable[[], tuple[EngineSnapshot | None, dict, int]]) -> None:
        """Scrape-time series: read() -> (snapshot, bytes sent by class, group stage)."""
        self.registry.register(_WorkerCollector(self.labels, read))

    def on_migration(
        self, mode: str, committed: bool, downtime_s: float, duration_s: float, num_bytes: int
    ) -> None:
        labels = self.labels
        outcome = "committed" if committed else "aborted"
        self.migrations.labels(**labels, mode=mode, outcome=outcome).inc()
        self.migration_duration.labels(**labels, mode=mode).observe(duration_s)
        self.migration_bytes.labels(**labels, mode=mode).inc(num_bytes)
        if committed:
            self.migration_downtime.labels(**labels, mode=mode).observe(downtime_s)

    def on_round_trip(self, seconds: float) -> None:
        self.activation_round_trip.labels(**self.labels).observe(seconds)
