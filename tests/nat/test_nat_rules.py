"""The pure rules of NAT upkeep (p2pinfer/net/nat_rules.py), property-based."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from p2pinfer.net.nat_rules import (
    Backoff,
    DialBackAnswer,
    NatTiming,
    PublicEvidence,
    RelayAction,
    RelayHealth,
    reannounce_wait,
)

seconds = st.floats(min_value=0.01, max_value=3600, allow_nan=False, allow_infinity=False)
answers = st.lists(st.sampled_from(list(DialBackAnswer)), max_size=5)


@given(seconds, seconds, st.integers(min_value=0, max_value=10_000))
def test_backoff_starts_at_first_doubles_and_never_passes_the_cap(first: float, cap: float, failures: int) -> None:
    backoff = Backoff(first, max(first, cap))
    assert backoff.delay(0) == first
    assert first <= backoff.delay(failures) <= backoff.max_s
    assert backoff.delay(failures) <= backoff.delay(failures + 1)  # never shorter after another failure
    if failures < 60 and first * 2 ** (failures + 1) <= backoff.max_s:
        assert backoff.delay(failures + 1) == 2 * backoff.delay(failures)


@given(st.lists(st.booleans(), max_size=40), st.integers(min_value=1, max_value=6))
def test_a_relay_is_lost_only_after_enough_failures_in_a_row(tries: list[bool], needed: int) -> None:
    health = RelayHealth(needed, Backoff(2.0, 30.0), check_s=10.0)
    in_a_row = 0
    for ok in tries:
        action = health.record(ok)
        in_a_row = 0 if ok else in_a_row + 1
        assert action is (RelayAction.KEEP if ok else
                          RelayAction.REPLACE if in_a_row >= needed else RelayAction.RETRY)
        # Healthy: the regular check; failing: the retry backoff, first retry soonest.
        assert health.next_check_s() == (10.0 if ok else Backoff(2.0, 30.0).delay(in_a_row - 1))


def test_the_default_timing_tolerates_transient_failures() -> None:
    timing = NatTiming()
    assert timing.relay_tries_before_lost >= 3 and timing.public_confirmations >= 3
    health = RelayHealth(timing.relay_tries_before_lost, timing.relay_retry, timing.relay_check_s)
    assert health.record(False) is RelayAction.RETRY  # one failure is not a lost relay (it used to be)


@given(st.lists(answers, max_size=30), st.integers(min_value=1, max_value=5), st.integers(min_value=1, max_value=6))
def test_public_needs_enough_reached_dial_backs_from_more_than_one_round(rounds: list[list[DialBackAnswer]],
                                                                        needed: int, window: int) -> None:
    evidence = PublicEvidence(needed, window)
    for i, answered in enumerate(rounds):
        evidence.record_round(answered)
        recent = rounds[max(0, i + 1 - window):i + 1]
        reached = [sum(a is DialBackAnswer.REACHED for a in r) for r in recent]
        assert evidence.reached() == sum(reached)
        assert evidence.confirmed() == (sum(reached) >= needed and sum(1 for r in reached if r) >= min(2, needed))


@given(st.lists(answers, min_size=1, max_size=30))
def test_failures_never_veto_and_the_check_backs_off_only_while_nothing_reaches_us(
        rounds: list[list[DialBackAnswer]]) -> None:
    evidence = PublicEvidence(3, 4)
    backoff = Backoff(60.0, 1800.0)
    quiet = 0
    for answered in rounds:
        evidence.record_round(answered)
        quiet = 0 if DialBackAnswer.REACHED in answered else quiet + 1
        assert evidence.next_check_s(backoff) == backoff.delay(quiet)
    with_failures = PublicEvidence(3, 4)  # extra failed answers in every round change nothing
    plain = PublicEvidence(3, 4)
    for answered in rounds:
        plain.record_round(answered)
        with_failures.record_round([*answered, DialBackAnswer.FAILED, DialBackAnswer.FAILED])
    assert with_failures.confirmed() == plain.confirmed()
    evidence.reset()
    assert not evidence.confirmed() and evidence.reached() == 0


def test_one_lucky_round_is_not_enough_but_three_rounds_of_one_honest_server_are() -> None:
    evidence = PublicEvidence(3, 4)
    evidence.record_round([DialBackAnswer.REACHED] * 3)
    assert not evidence.confirmed()  # three at once: one moment, one round
    lying = [DialBackAnswer.REACHED, DialBackAnswer.FAILED, DialBackAnswer.FAILED]  # one honest, two liars
    evidence = PublicEvidence(3, 4)
    for _ in range(2):
        evidence.record_round(lying)
        assert not evidence.confirmed()
    evidence.record_round(lying)
    assert evidence.confirmed()


addrs = st.lists(st.sampled_from(["/ip4/1.2.3.4/tcp/1", "/ip4/5.6.7.8/tcp/2/p2p/R/p2p-circuit"]), max_size=3)


@given(addrs, addrs, st.one_of(st.none(), seconds), st.floats(min_value=0, max_value=7200), seconds)
def test_reannounce_only_on_changed_addresses_and_at_most_once_per_interval(
        before: list[str], now_addrs: list[str], last_at: float | None, elapsed: float, interval: float) -> None:
    now = (last_at or 0.0) + elapsed  # trio's clock never goes back
    wait = reannounce_wait(before, now_addrs, last_at, now, interval)
    if before == now_addrs:
        assert wait is None
        return
    assert wait is not None and 0.0 <= wait <= interval
    if last_at is None or now - last_at >= interval:  # now - last_at, not elapsed: the sum rounds
        assert wait == 0.0
    else:
        assert abs(now + wait - (last_at + interval)) < 1e-6
