"""The per-peer token buckets of p2pinfer.request.limits (pure rules, property-tested)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pinfer.request.limits import OFFER_RATE, VERIFY_RATE, PeerRateLimiter, Rate, TokenBucket

rates = st.builds(Rate, per_second=st.floats(0.01, 1000.0), burst=st.integers(1, 200))
gaps = st.lists(st.floats(0.0, 5.0), min_size=1, max_size=300)


def times_from(start: float, deltas: list[float]) -> list[float]:
    out, t = [], start
    for d in deltas:
        t += d
        out.append(t)
    return out


@given(rates, gaps, st.floats(0.0, 1e6))
def test_never_more_than_burst_plus_rate_times_elapsed(rate, deltas, start):
    bucket = TokenBucket(rate, start)
    times = times_from(start, deltas)
    allowed = [t for t in times if bucket.take(t)]
    if allowed:
        assert len(allowed) <= rate.burst + rate.per_second * (allowed[-1] - start) + 1e-6


@given(rates, st.integers(1, 200), st.floats(0.0, 1e6))
def test_a_peer_at_or_below_the_rate_is_never_refused(rate, count, start):
    bucket = TokenBucket(rate, start)
    interval = 1.0 / rate.per_second
    assert all(bucket.take(start + i * interval * 1.000001) for i in range(count))


@given(rates, st.floats(0.0, 1e6))
def test_a_full_bucket_allows_exactly_burst_at_once(rate, now):
    bucket = TokenBucket(rate, now)
    assert sum(bucket.take(now) for _ in range(rate.burst + 5)) == rate.burst
    assert bucket.retry_after(now) == pytest.approx(1.0 / rate.per_second)


@given(rates, st.floats(0.0, 1e6), st.floats(0.001, 1e6))
def test_a_clock_that_goes_backwards_adds_nothing(rate, now, back):
    bucket = TokenBucket(rate, now)
    while bucket.take(now):
        pass
    assert not bucket.take(now - back)
    assert not bucket.take(now)


@given(st.lists(st.sampled_from("abcdefgh"), max_size=400), st.integers(1, 8))
def test_buckets_are_per_peer_and_bounded(peers, max_peers):
    rate = Rate(per_second=1.0, burst=3)
    limiter = PeerRateLimiter(rate, max_peers=max_peers)
    for peer in peers:  # all at one instant: every peer is flooding
        limiter.allow(peer, 0.0)
        assert len(limiter) <= max_peers
    # A peer that never flooded gets its whole burst, whatever the others did.
    assert all(limiter.allow("honest", 0.0) for _ in range(rate.burst))
    assert not limiter.allow("honest", 0.0)


def test_declared_limits_are_sane():
    assert OFFER_RATE.burst >= 2 * OFFER_RATE.per_second >= 2
    assert VERIFY_RATE.per_second >= 1 and VERIFY_RATE.burst >= 4
    with pytest.raises(ValueError):
        Rate(per_second=0.0, burst=1)
    with pytest.raises(ValueError):
        Rate(per_second=1.0, burst=0)
