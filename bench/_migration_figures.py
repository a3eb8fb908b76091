"""Figures of one migration, from the token streams (times and producing node per token)
of the moved request and of its neighbours: shared by the in-process and the process
runs of bench/migration.py."""

from __future__ import annotations

import statistics


def _handover_index(entries, start: int, src: str, dst: str) -> int:
    """Index of the request's first token from dst right after one from src (after start)."""
    for i in range(max(start, 1), len(entries)):
        if entries[i][1] == dst and entries[i - 1][1] == src:
            return i
    raise RuntimeError("no handover found in the token stream")


def handover_gap(entries, start: int, src: str, dst: str) -> tuple[float, float]:
    """(gap between the last src token and the first dst token after index start,
    median dst inter-token interval right after) in seconds."""
    i = _handover_index(entries, start, src, dst)
    after = [entries[j + 1][0] - entries[j][0] for j in range(i, min(i + 6, len(entries) - 1))]
    return entries[i][0] - entries[i - 1][0], statistics.median(after)


def handover_time(entries, start: int, src: str, dst: str) -> float:
    """Time of the request's last token from src before it moved to dst (after index
    start): the end of the window in which src's other requests shared steps with it."""
    return entries[_handover_index(entries, start, src, dst) - 1][0]


def resident_since(entries, src: str) -> float:
    """When the request's current run on src began: the time of the first token of the
    trailing run of tokens from src (the baseline window for the slowdown of src's other
    requests, which share their steps with it: before it arrived, their steps were
    shorter, and comparing with those would charge its own presence to the migration)."""
    i = len(entries) - 1
    while i > 0 and entries[i - 1][1] == src:
        i -= 1
    return entries[i][0]


def interval_mean(entries, t0: float, t1: float) -> float | None:
    times = [t for t, _ in entries if t0 <= t <= t1]
    if len(times) < 2:
        return None
    return (times[-1] - times[0]) / (len(times) - 1)


def move_figures(
    entries, background, start: int, since: float, t0: float, src: str, dst: str, mode, result
) -> dict:
    """The figures of one move src -> dst begun at t0 (token index `start`, the request on
    src since `since`), from its token stream, its neighbours' (`background`) and the
    coordinator's result."""
    gap, dst_step = handover_gap(entries, start, src, dst)
    # While the stages run beside it, up to its last token on src (after that src's steps
    # no longer carry it and are shorter, which is no merit of the migration).
    until = handover_time(entries, start, src, dst)
    during = [interval_mean(other, t0, until) for other in background]
    before = [interval_mean(other, since, t0) for other in background]
    stream_gap_ms = max(gap - dst_step, 0.0) * 1000
    return {
        # The request is runnable again once adopted (the destination's next step takes
        # it); a re-prefill only starts then, so recompute's stall is seen in the stream.
        "downtime_ms": stream_gap_ms if mode == "recompute" else result.downtime_ms,
        "stream_gap_ms": stream_gap_ms,
        "coordinator_downtime_ms": result.downtime_ms,
        "num_stages": result.num_stages,
        "num_blocks": result.num_blocks,
        "num_bytes": result.num_bytes,
        "bg_during_s": [d for d in during if d is not None],
        "bg_before_s": [x for x in before if x is not None],
    }


def median_sample(samples: list[dict]) -> dict:
    """The sample of median downtime, with every sample's downtime and the median stream
    gap beside it (one decode step's jitter is in every gap)."""
    samples = sorted(samples, key=lambda x: x["downtime_ms"])
    return {
        **samples[len(samples) // 2],
        "samples_ms": [x["downtime_ms"] for x in samples],
        "stream_gap_median_ms": statistics.median(x["stream_gap_ms"] for x in samples),
    }
