"""The latency figures of `llmesh bench serve`, as `vllm bench serve` defines them."""

from __future__ import annotations

from bench._serve_clients import RequestTiming, latency_summary, percentile


def test_percentile_interpolates_like_numpy():
    values = [10.0, 20.0, 30.0, 40.0]
    assert [percentile(values, q) for q in (0, 50, 99, 100)] == [10.0, 25.0, 39.7, 40.0]
    assert percentile([5.0], 99) == 5.0


def test_ttft_and_tpot_summaries():
    timings = [
        RequestTiming(ttft_s=0.1, latency_s=1.1, num_tokens=11),  # TPOT 0.1 s
        RequestTiming(ttft_s=0.3, latency_s=0.5, num_tokens=5),  # TPOT 0.05 s
        RequestTiming(ttft_s=0.2, latency_s=0.2, num_tokens=1),  # no TPOT with one token
    ]
    assert latency_summary("http", timings) == {
        "http_mean_ttft_ms": 200.0,
        "http_median_ttft_ms": 200.0,
        "http_p99_ttft_ms": 298.0,
        "http_mean_tpot_ms": 75.0,
        "http_median_tpot_ms": 75.0,
        "http_p99_tpot_ms": 99.5,
    }
