"""The worker's metrics: scrape-time engine gauges and migration events."""

from __future__ import annotations

from services.worker.async_engine import EngineSnapshot
from services.worker.engine import EngineStats
from services.worker.metrics import WorkerMetrics

LABELS = {"model_name": "tiny", "instance_id": "worker-0"}


def _snapshot(**stats) -> EngineSnapshot:
    base = dict(
        num_running=3, num_waiting=2, num_total_blocks=100, num_free_blocks=75, num_used_blocks=25,
        num_hol_blocks=0, num_running_high_priority=0, num_preemptions=4, num_reserved_blocks=0,
        num_suspended=0,
    )  # fmt: skip
    return EngineSnapshot(EngineStats(**{**base, **stats}), (), 0, 0.0)


def test_engine_gauges_and_data_plane_bytes_are_read_at_scrape_time():
    metrics = WorkerMetrics("worker-0", "tiny")
    view = {"snapshot": _snapshot(), "bytes": {"activation": 10, "kv": 4096}, "stage": -1}
    metrics.watch(lambda: (view["snapshot"], view["bytes"], view["stage"]))
    value = metrics.registry.get_sample_value
    assert value("llmesh:num_requests_running", LABELS) == 3
    assert value("llmesh:num_requests_waiting", LABELS) == 2
    assert value("llmesh:kv_cache_usage_perc", LABELS) == 0.25
    assert value("llmesh:num_preemptions_total", LABELS) == 4
    assert value("llmesh:data_plane_bytes_sent_total", {**LABELS, "traffic_class": "kv"}) == 4096
    assert value("llmesh:kunserve_stage", LABELS) == -1
    view.update(snapshot=_snapshot(num_used_blocks=100, num_preemptions=5), stage=1)
    assert value("llmesh:kv_cache_usage_perc", LABELS) == 1.0
    assert value("llmesh:num_preemptions_total", LABELS) == 5
    assert value("llmesh:kunserve_stage", LABELS) == 1


def test_a_scrape_racing_the_shutdown_gets_no_engine_series():
    metrics = WorkerMetrics("worker-0", "tiny")

    def gone():
        raise RuntimeError("transport not started")

    metrics.watch(gone)
    assert metrics.registry.get_sample_value("llmesh:num_requests_running", LABELS) is None


def test_migrations_by_mode_and_outcome_with_downtime_only_when_committed():
    metrics = WorkerMetrics("worker-0", "tiny")
    value = metrics.registry.get_sample_value
    live = {**LABELS, "mode": "live"}
    # Every label set exists before the first migration.
    assert value("llmesh:migrations_total", {**live, "outcome": "committed"}) == 0
    metrics.on_migration("live", True, 0.004, 0.25, 65536)
    metrics.on_migration("live", False, 0.0, 0.1, 16384)
    assert value("llmesh:migrations_total", {**live, "outcome": "committed"}) == 1
    assert value("llmesh:migrations_total", {**live, "outcome": "aborted"}) == 1
    assert value("llmesh:migration_downtime_seconds_count", live) == 1
    assert value("llmesh:migration_downtime_seconds_sum", live) == 0.004
    assert value("llmesh:migration_duration_seconds_count", live) == 2
    assert value("llmesh:migration_bytes_total", live) == 65536 + 16384
    metrics.on_round_trip(0.003)
    assert value("llmesh:activation_latency_seconds_count", LABELS) == 1
