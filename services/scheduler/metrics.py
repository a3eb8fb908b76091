"""The scheduler's Prometheus metrics (names: services/common/metrics.py).

Its view of the cluster (freeness, virtual usage, KV usage per instance; groups) and
its decisions (dispatches by policy and outcome, migrations ordered, KunServe drops and
restores) are read at scrape time from what the servicer already counts; control-loop
round times are recorded as they happen.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from services.common.metrics import LATENCY_BUCKETS, PREFIX, GaugeCollector


class _DecisionCollector(Collector):
    """Counters the servicer and its group control keep as plain integers."""

    def __init__(self, servicer) -> None:
        self._servicer = servicer

    def collect(self):
        servicer = self._servicer
        dispatches = CounterMetricFamily(
            PREFIX + "dispatch_decisions",
            "Dispatch decisions by policy and outcome (dispatched, no_candidate).",
            labels=["policy", "outcome"],
        )
        for outcome, count in sorted(servicer.dispatch_outcomes.items()):
            dispatches.add_metric([servicer.config.dispatch_policy, outcome], count)
        ordered = CounterMetricFamily(
            PREFIX + "migrations_ordered",
            "Migrations the scheduler ordered, by migration policy.",
            labels=["policy"],
        )
        ordered.add_metric([servicer.migration_policy_name], servicer.num_migrations_ordered)
        operations = servicer.group_control.outcomes
        families = [dispatches, ordered]
        for operation in ("drop", "restore"):
            family = CounterMetricFamily(
                PREFIX + f"kunserve_{operation}s",
                f"KunServe group {operation}s by outcome (ok, failed).",
                labels=["outcome"],
            )
            for outcome in ("ok", "failed"):
                family.add_metric([outcome], operations.get((operation, outcome), 0))
            families.append(family)
        return families


def _cluster_rows(servicer):
    """The scheduler's view of each instance, and its groups."""
    records = list(servicer.registry.records())
    yield PREFIX + "instances", "Registered instances.", {}, len(records)
    yield (
        PREFIX + "kunserve_groups",
        "KunServe groups (forming, serving or restoring).",
        {},
        len(servicer.groups),
    )
    for record in records:
        load = record.report.load
        labels = {"instance_id": record.spec.instance_id, "model_name": record.spec.model_id}
        yield (
            PREFIX + "instance_freeness",
            "Llumnix freeness: decode steps the free KV blocks last per running request.",
            labels,
            load.freeness,
        )
        yield (
            PREFIX + "instance_virtual_usage",
            "Llumnix virtual usage in blocks (physical use plus queued and headroom demand).",
            labels,
            load.virtual_usage,
        )
        yield (
            PREFIX + "instance_kv_usage_perc",
            "KV usage the instance last reported (1 = full).",
            labels,
            load.num_used_blocks / load.num_total_blocks if load.num_total_blocks else 0.0,
        )


class SchedulerMetrics:
    """Every metric of the scheduler process, on its own registry."""

    def __init__(self, servicer) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_DecisionCollector(servicer))
        self.registry.register(GaugeCollector(lambda: _cluster_rows(servicer)))
        self.loop_seconds = Histogram(
            PREFIX + "scheduler_loop_seconds",
            "Time one round of a control loop took (migration, scaling, groups).",
            ["loop"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

    def on_round(self, loop: str, seconds: float) -> None:
        self.loop_seconds.labels(loop=loop).observe(seconds)
