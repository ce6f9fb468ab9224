"""The Yamux buffer rule on its own (``p2pinfer/net/yamux_bounds.py``): what it lets through and what it stops.

The wire-level attack is ``tests/adversarial/test_memory.py``; here the table is driven the way py-libp2p's
``handle_incoming`` drives it (append, then subtract from the window, clamped at zero), so the rule can be
checked over many sequences: an honest sender never trips it, any sender beyond its window by more than the
slack does (and is a provable fault), and a connection whose unread buffers outgrow the limit is closed
without blaming the peer.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pinfer.net.resources import ResourceLimits
from p2pinfer.net.yamux_bounds import INITIAL_WINDOW, WindowOverrun, _BoundedBuffers

LIMITS = ResourceLimits(yamux_stream_buffer_slack=64 * 1024, yamux_connection_buffer=4 * INITIAL_WINDOW)


class Connection:
    """The two tables py-libp2p's ``Yamux`` keeps that the rule reads, updated as ``handle_incoming`` does."""

    def __init__(self) -> None:
        self.peer_id = None
        self.streams: dict[int, SimpleNamespace] = {}
        self.overruns: list[tuple[str, bool]] = []
        self.stream_buffers = _BoundedBuffers(self, LIMITS, lambda peer, why, provable:
                                              self.overruns.append((why, provable)))

    def open(self, sid: int) -> None:
        self.streams[sid] = SimpleNamespace(recv_window=INITIAL_WINDOW)
        self.stream_buffers[sid] = bytearray()

    def receive(self, sid: int, n: int) -> None:
        self.stream_buffers[sid].extend(b"\0" * n)
        stream = self.streams[sid]
        stream.recv_window = max(stream.recv_window - n, 0)

    def read_all(self, sid: int) -> None:
        """The handler reads everything and we grant it again (a WINDOW_UPDATE of what was read)."""
        read = len(self.stream_buffers[sid])
        del self.stream_buffers[sid][:]
        self.streams[sid].recv_window += read


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.floats(0, 1), st.booleans()), max_size=60))
def test_an_honest_sender_never_trips_the_stream_rule(steps: list[tuple[int, float, bool]]) -> None:
    conn = Connection()
    for sid in range(4):
        conn.open(sid)
    for sid, share, read in steps:
        window = conn.streams[sid].recv_window
        conn.receive(sid, int(window * share))  # never more than the window we granted
        if read:
            conn.read_all(sid)
    assert conn.overruns == []


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 60_000), st.integers(0, INITIAL_WINDOW))
def test_bytes_beyond_the_window_add_up_to_a_provable_overrun(frame: int, first: int) -> None:
    conn = Connection()
    conn.open(1)
    conn.receive(1, first)  # within the window
    with pytest.raises(WindowOverrun):
        # py-libp2p zeroes the window after an overrun: each frame beyond it must count, however small
        for _ in range((INITIAL_WINDOW + LIMITS.yamux_stream_buffer_slack) // frame + 2):
            conn.receive(1, frame)
    assert conn.overruns and conn.overruns[0][1] is True
    assert len(conn.stream_buffers[1]) <= INITIAL_WINDOW + LIMITS.yamux_stream_buffer_slack


def test_a_full_connection_buffer_closes_the_connection_without_blaming_the_peer() -> None:
    conn = Connection()
    for sid in range(5):  # each stream within its own window: honest, but nobody reads them
        conn.open(sid)
    with pytest.raises(WindowOverrun):
        for sid in range(5):
            conn.receive(sid, INITIAL_WINDOW)
    assert conn.overruns == [(conn.overruns[0][0], False)]
    assert "on one connection" in conn.overruns[0][0]
