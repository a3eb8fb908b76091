"""The gateway's own view of TTFT during a soak phase, from its Prometheus histogram.

The load generator's TTFT includes its own lag: on a starved host its event loop reads
a first chunk long after the gateway sent it. The gateway's histogram
(`llmesh:time_to_first_token_seconds`, request arrival at the gateway to its first token)
is what admission control bounds. A phase's P99 comes from the difference of two scrapes,
as the bucket bound it falls under (a histogram cannot say more; Prometheus's
histogram_quantile would interpolate inside the bucket).
"""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

TTFT_METRIC = "llmesh:time_to_first_token_seconds"


def scrape_ttft_buckets(metrics_address: str) -> dict[float, float]:
    """Cumulative bucket counts {upper bound: count} of the gateway's TTFT histogram."""
    with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != TTFT_METRIC:
            continue
        for sample in family.samples:
            if sample.name == TTFT_METRIC + "_bucket":
                buckets[float(sample.labels["le"])] = sample.value
    if not buckets:
        raise RuntimeError(f"{metrics_address}/metrics has no {TTFT_METRIC} histogram")
    return buckets


def quantile_upper_bound(
    before: dict[float, float], after: dict[float, float], q: float
) -> float | None:
    """The smallest bucket bound under which at least q of the requests counted between
    the two scrapes fall (inf: beyond the last bucket; None: no request)."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]  # cumulative, per bound
    total = counts[-1]
    if total <= 0:
        return None
    for bound, count in zip(bounds, counts, strict=True):
        if count >= q * total:
            return bound
    return float("inf")
