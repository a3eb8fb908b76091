"""bench/_soak_rss.py: RSS from /proc and its least-squares slope per minute."""

from __future__ import annotations

import os
import time

import pytest

from bench._soak_rss import RssSampler, read_rss_mib, slope_per_min


def test_the_slope_of_a_line_is_its_growth_per_minute():
    assert slope_per_min([(t, 100 + 0.5 * t) for t in range(0, 120, 2)]) == pytest.approx(30.0)
    assert slope_per_min([(t, 42.0) for t in range(10)]) == 0.0
    assert slope_per_min([(0.0, 1.0)]) == 0.0


def test_rss_of_a_live_process_and_of_none():
    assert read_rss_mib(os.getpid()) > 1.0
    assert read_rss_mib(2**22 + 12345) is None  # above pid_max: never a process


def test_the_sampler_reports_each_process_after_warm_up():
    sampler = RssSampler({"self": os.getpid()}, interval_s=0.01).start()
    while len(sampler.samples["self"]) < 3:
        time.sleep(0.01)
    sampler.stop()
    summary = sampler.summary(warmup_s=0.0)["self"]
    assert set(summary) == {"rss_start_mib", "rss_end_mib", "rss_slope_mib_per_min"}
    assert summary["rss_end_mib"] > 1.0
