"""PipelineStats.summary: what a dissolved group's log line says of its pipeline."""

from services.worker.kunserve.pipeline import PipelineStats


def test_summary_of_a_pipeline():
    stats = PipelineStats(num_micro_batches=3, busy_s=0.12345, modelled_busy_s=0.5)
    stats.samples_ms.extend([10.0, 20.0, 45.0])
    assert stats.summary() == {
        "num_micro_batches": 3,
        "stage0_busy_s": 0.123,
        "modelled_busy_s": 0.5,
        "mean_round_trip_ms": 25.0,
    }


def test_summary_before_any_round_trip():
    assert PipelineStats().summary()["mean_round_trip_ms"] is None
