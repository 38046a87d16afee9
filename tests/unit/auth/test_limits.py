"""The per-key limiter, driven by a fake clock (no sleeps)."""

from __future__ import annotations

import pytest

from server.auth.limits import KeyLimiter, KeyLimits
from server.errors import Code, ForbiddenModel, KeyRateLimited, QuotaExceeded, TooManyConnections, TooManyStreams


def test_models_outside_the_allowlist_are_forbidden_and_cost_nothing():
    lim = KeyLimiter()
    limits = KeyLimits(models=frozenset({"demo"}), rpm=1)
    with pytest.raises(ForbiddenModel) as info:
        lim.admit("k", limits, "gpt-4o", 0, 0.0)
    assert info.value.code is Code.FORBIDDEN_MODEL
    lim.admit("k", limits, "demo", 0, 0.0)  # the refused start did not use the one request


def test_requests_per_minute_slide_and_say_when_to_retry():
    lim = KeyLimiter()
    limits = KeyLimits(rpm=2)
    lim.admit("k", limits, "demo", 0, 100.0)
    lim.admit("k", limits, "demo", 0, 110.0)
    with pytest.raises(KeyRateLimited) as info:
        lim.admit("k", limits, "demo", 0, 130.0)
    assert info.value.code is Code.RATE_LIMITED and info.value.retryable
    assert info.value.retry_after_s == pytest.approx(30.0)  # the 100.0 request leaves at 160.0
    lim.admit("k", limits, "demo", 0, 160.5)
    lim.admit("other", limits, "demo", 0, 130.0)  # keys do not share counters


def test_tokens_per_minute_count_as_streams_end():
    lim = KeyLimiter()
    limits = KeyLimits(tpm=100)
    lim.admit("k", limits, "demo", 0, 0.0)
    lim.charge("k", 60, limits, 10.0)
    lim.admit("k", limits, "demo", 0, 11.0)  # 60 < 100
    lim.charge("k", 50, limits, 20.0)
    with pytest.raises(KeyRateLimited) as info:
        lim.admit("k", limits, "demo", 0, 30.0)
    assert info.value.retry_after_s == pytest.approx(40.0)  # the 60 leave the window at 70.0
    lim.admit("k", limits, "demo", 0, 70.5)


def test_concurrency_counts_live_streams():
    lim = KeyLimiter()
    limits = KeyLimits(concurrency=2)
    lim.admit("k", limits, "demo", 1, 0.0)
    with pytest.raises(TooManyStreams):
        lim.admit("k", limits, "demo", 2, 0.0)


def test_budget_is_per_period_and_retry_after_is_the_next_period():
    lim = KeyLimiter()
    limits = KeyLimits(budget_tokens=100, budget_period_s=3600)
    lim.admit("k", limits, "demo", 0, 3600.0)
    lim.charge("k", 150, limits, 3700.0)  # a running stream may overshoot
    with pytest.raises(QuotaExceeded) as info:
        lim.admit("k", limits, "demo", 0, 4000.0)
    assert info.value.code is Code.QUOTA_EXCEEDED
    assert info.value.retry_after_s == pytest.approx(3200.0)
    lim.admit("k", limits, "demo", 0, 7200.0)  # a new period


def test_connections_are_held_and_released():
    lim = KeyLimiter()
    limits = KeyLimits(connections=1)
    lim.open_connection("k", limits)
    with pytest.raises(TooManyConnections):
        lim.open_connection("k", limits)
    lim.close_connection("k")
    lim.open_connection("k", limits)


def test_zero_means_no_limit():
    lim = KeyLimiter()
    for i in range(1000):
        lim.admit("k", KeyLimits(), "anything", 500, float(i) / 100)
        lim.charge("k", 10_000, KeyLimits(), float(i) / 100)
