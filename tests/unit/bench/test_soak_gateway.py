"""bench/_soak_gateway.py: a phase's TTFT quantile from two scrapes of a histogram."""

from __future__ import annotations

import math

from bench._soak_gateway import quantile_upper_bound

BEFORE = {0.5: 10.0, 1.0: 10.0, 2.5: 10.0, math.inf: 10.0}  # 10 requests before the phase


def test_the_quantile_is_the_first_bound_holding_that_share_of_the_phase():
    # The phase adds 100 requests: 90 under 0.5 s, 9 in (0.5, 1], 1 in (1, 2.5].
    after = {0.5: 100.0, 1.0: 109.0, 2.5: 110.0, math.inf: 110.0}
    assert quantile_upper_bound(BEFORE, after, 0.90) == 0.5
    assert quantile_upper_bound(BEFORE, after, 0.99) == 1.0
    assert quantile_upper_bound(BEFORE, after, 1.0) == 2.5


def test_beyond_the_last_bucket_is_inf_and_an_empty_phase_is_none():
    after = {0.5: 10.0, 1.0: 10.0, 2.5: 10.0, math.inf: 12.0}
    assert quantile_upper_bound(BEFORE, after, 0.5) == math.inf
    assert quantile_upper_bound(BEFORE, dict(BEFORE), 0.99) is None
