"""The election's closing rule (pure): when the client stops waiting for bids."""

from __future__ import annotations

from hypothesis import given, strategies as st

from p2pinfer.request.bid_window import GRACE_S, BidWindow, Closed


def test_closes_when_every_candidate_answered() -> None:
    w = BidWindow(candidates=2, enough=4, opened_at=0.0, timeout_s=3.0)
    w.record(0.1, valid=True)
    assert w.close_at() == 3.0
    w.record(0.2, valid=False)  # a dial failure answers at once
    assert w.close_at() <= 0.2 and w.reason(0.2) is Closed.ALL_ANSWERED


def test_grace_after_enough_valid_bids_bounds_a_silent_candidate() -> None:
    w = BidWindow(candidates=5, enough=4, opened_at=0.0, timeout_s=3.0)
    for t in (0.1, 0.2, 0.3, 0.4):
        w.record(t, valid=True)
    assert w.close_at() == 0.4 + GRACE_S
    assert w.reason(0.4 + GRACE_S) is Closed.GRACE_AFTER_QUORUM


def test_too_few_bids_keep_the_full_timeout() -> None:
    w = BidWindow(candidates=5, enough=4, opened_at=1.0, timeout_s=3.0)
    for t in (1.1, 1.2, 1.3):
        w.record(t, valid=True)
    w.record(1.4, valid=False)  # a refusal does not count toward enough
    assert w.close_at() == 4.0 and w.reason(4.0) is Closed.TIMEOUT


@given(st.lists(st.tuples(st.floats(0, 10), st.booleans()), max_size=12), st.integers(0, 6),
       st.integers(0, 12), st.floats(0.1, 10))
def test_never_later_than_the_timeout_and_never_before_enough_or_all(answers, enough, extra, timeout) -> None:
    answers = sorted(answers)
    w = BidWindow(candidates=len(answers) + extra, enough=enough, opened_at=0.0, timeout_s=timeout)
    for t, valid in answers:
        if t >= w.close_at():
            break
        w.record(t, valid=valid)
    close = w.close_at()
    assert close <= timeout
    if w.answered < w.candidates and close < timeout:
        # closed early only by the grace rule: enough valid bids, grace_s before the close
        assert w.valid >= enough and w.enough_at is not None and close == w.enough_at + GRACE_S
