"""gateway.key_limits: per-client-key concurrency and token-bucket rate, exact hints."""

from __future__ import annotations

import hashlib

import pytest

from gateway.key_limits import ANONYMOUS, KeyLimits, client_key, key_from_metadata
from services.common.errors import ResourceExhaustedError
from tests.clock import FakeClock

KEY_A = hashlib.sha256(b"sk-a").hexdigest()


@pytest.mark.parametrize(
    ("authorization", "key"),
    [
        ("Bearer sk-a", KEY_A),
        ("bearer   sk-a  ", KEY_A),
        (None, ANONYMOUS),
        ("", ANONYMOUS),
        ("Bearer ", ANONYMOUS),
        ("Basic dXNlcjpwdw==", ANONYMOUS),
    ],
)
def test_a_client_is_known_by_the_sha256_of_its_bearer_token(authorization, key):
    assert client_key(authorization) == key


def test_the_key_of_grpc_metadata():
    assert key_from_metadata((("x-other", "1"), ("authorization", "Bearer sk-a"))) == KEY_A
    assert key_from_metadata((("x-other", "1"),)) == ANONYMOUS
    assert key_from_metadata(None) == ANONYMOUS


def test_off_by_default_counts_nothing():
    limits = KeyLimits()
    for _ in range(1000):
        limits.acquire(KEY_A)
    assert (limits.is_enabled, limits.num_inflight(KEY_A)) == (False, 0)


def test_the_token_bucket_refuses_with_the_exact_wait_for_its_next_token():
    clock = FakeClock(100.0)
    limits = KeyLimits(rate_per_s=4.0, burst=2, clock=clock)
    limits.acquire(KEY_A)
    limits.acquire(KEY_A)
    with pytest.raises(ResourceExhaustedError) as info:
        limits.acquire(KEY_A)
    assert info.value.retry_after_s == 0.25
    assert info.value.trailing_metadata() == (("retry-after-ms", "250"),)
    assert "key_rate_per_s=4.0" in str(info.value)
    limits.acquire(ANONYMOUS)  # another key has its own bucket
    clock.now += 0.1
    with pytest.raises(ResourceExhaustedError) as info:
        limits.acquire(KEY_A)
    assert info.value.retry_after_s == pytest.approx(0.15)
    assert info.value.trailing_metadata() == (("retry-after-ms", "150"),)
    clock.now += 0.15
    limits.acquire(KEY_A)  # one token refilled
    clock.now += 10.0  # refills up to the burst, not beyond
    limits.acquire(KEY_A)
    limits.acquire(KEY_A)
    with pytest.raises(ResourceExhaustedError):
        limits.acquire(KEY_A)


def test_the_concurrency_limit_counts_requests_in_flight_and_spends_no_token():
    clock = FakeClock()
    limits = KeyLimits(max_concurrent=2, rate_per_s=1.0, burst=3, retry_after_s=0.5, clock=clock)
    limits.acquire(KEY_A)
    limits.acquire(KEY_A)
    with pytest.raises(ResourceExhaustedError) as info:
        limits.acquire(KEY_A)
    assert (info.value.retry_after_s, limits.num_inflight(KEY_A)) == (0.5, 2)
    assert "key_max_concurrent=2" in str(info.value)
    limits.release(KEY_A)
    limits.acquire(KEY_A)  # the refused try did not spend the third token
    limits.release(KEY_A)
    limits.release(KEY_A)
    limits.release(KEY_A)  # an extra release never goes below zero
    assert limits.num_inflight(KEY_A) == 0


def test_idle_keys_are_forgotten_past_the_table_size(monkeypatch):
    monkeypatch.setattr("gateway.key_limits.MAX_IDLE_KEYS", 3)
    clock = FakeClock()
    limits = KeyLimits(max_concurrent=1, clock=clock)
    for key in ("a", "b", "c"):
        limits.acquire(key)
    limits.release("a")
    limits.release("b")
    limits.acquire("d")  # a and b were idle: forgotten; c is in flight: kept
    assert sorted(limits._keys) == ["c", "d"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_concurrent": 0}, "key_max_concurrent=0 must be > 0 or None"),
        ({"rate_per_s": 0.0}, "key_rate_per_s=0.0 must be > 0 or None"),
        ({"burst": 0}, "key_burst=0 must be >= 1"),
    ],
)
def test_bad_limits_name_the_field(kwargs, message):
    with pytest.raises(ValueError) as info:
        KeyLimits(**kwargs)
    assert str(info.value) == message
