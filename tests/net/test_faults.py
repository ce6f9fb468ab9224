"""Fault book rules (pure): decaying scores, bans at the threshold, bounded memory."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from p2pinfer.net.faults import BAN_S, BAN_SCORE, FAULT_HALF_LIFE_S, FaultBook, FaultKind


def test_a_window_overrun_bans_at_once_and_the_ban_expires() -> None:
    book = FaultBook()
    assert book.record("p", FaultKind.WINDOW_OVERRUN, now=0.0)
    assert book.is_banned("p", now=BAN_S - 1) and not book.is_banned("p", now=BAN_S + 1)


def test_three_invalid_gossip_messages_ban_and_two_do_not() -> None:
    book = FaultBook()
    assert not book.record("p", FaultKind.INVALID_GOSSIP, now=0.0)
    assert not book.record("p", FaultKind.INVALID_GOSSIP, now=1.0)
    assert book.record("p", FaultKind.INVALID_GOSSIP, now=2.0)


def test_faults_spread_over_time_decay_and_never_ban() -> None:
    book = FaultBook()
    for i in range(100):  # one malformed stream every 5 half-lives
        assert not book.record("p", FaultKind.MALFORMED_STREAM, now=i * 5 * FAULT_HALF_LIFE_S)
    assert book.score("p", now=100 * 5 * FAULT_HALF_LIFE_S) < BAN_SCORE


@given(st.lists(st.tuples(st.integers(0, 50), st.sampled_from(list(FaultKind))), max_size=300))
def test_memory_is_bounded(events: list[tuple[int, FaultKind]]) -> None:
    book = FaultBook(max_peers=10)
    for t, (peer, kind) in enumerate(events):
        book.record(f"peer-{peer}", kind, now=float(t))
        assert len(book._scores) <= 10 and len(book._banned_until) <= 10


def test_many_banned_peers_stay_bounded() -> None:
    book = FaultBook(max_peers=10)
    for i in range(50):
        assert book.record(f"p{i}", FaultKind.WINDOW_OVERRUN, now=float(i))
    assert len(book.banned(now=50.0)) == 10 and book.is_banned("p49", now=50.0)
