"""Bounded Yamux receive buffers: a peer that sends past the window we granted loses its connection.

Upstream bug (py-libp2p 0.8.1, ``libp2p/stream_muxer/yamux/yamux.py``): when a DATA frame carries more
than the stream's remaining receive window, ``Yamux.handle_incoming`` logs "peer exceeded receive window"
and appends the bytes to the stream's buffer anyway, so a peer that ignores flow control grows our memory
without limit (about 1 GB of RSS per GiB sent) on any stream whose handler is not reading at that moment.
The Yamux spec makes such a frame a protocol error. ``MuxerMultistream.new_conn`` also constructs
``Yamux`` directly (the class given in ``muxer_opt`` is ignored for ``/yamux/1.0.0``), so a subclass
cannot be slotted in.

The fix, in one place: :func:`bound_yamux_buffers` wraps the host's upgrader so that every new Yamux
connection gets a :class:`_BoundedBuffers` table before it starts reading. Each stream's buffer checks
every append against the stream's remaining receive window (``recv_window``: what we granted and the peer has
not yet used; py-libp2p raises it before it sends the WINDOW_UPDATE, so an honest sender never exceeds it).
The bytes beyond it add up per stream, because py-libp2p resets the window to zero after an overrun; more
than a little slack in all is a window overrun, and so is more than the connection's total buffer limit. The buffer then refuses the bytes and raises
:class:`WindowOverrun`; ``handle_incoming`` answers that by closing the connection and clearing every
buffer (its own cleanup path), so the memory is returned at once. Bytes beyond a stream's window are the peer's
provable fault (nothing honest sends them): a ``window-overrun`` fault, a ban. A full connection buffer is
not: an honest peer whose streams we leave unread could fill many windows at once, so that connection is
only closed (``on_overrun(..., provable=False)``).
"""

from __future__ import annotations

from typing import Any, Callable

import trio

from libp2p.stream_muxer.yamux.yamux import DEFAULT_WINDOW_SIZE as INITIAL_WINDOW

from ..log import get_logger
from .resources import ResourceLimits

log = get_logger("p2pinfer.net.yamux")

OverrunHandler = Callable[[str, str, bool], None]
"""``(peer_id, why, provable)``: called once per connection that is closed for its buffers."""


class WindowOverrun(trio.TooSlowError):
    """A peer sent Yamux DATA beyond the receive window (the connection is being closed).

    A ``trio.TooSlowError`` because that is the one exception ``handle_incoming`` lets out of its
    per-frame handlers and answers by closing the connection and clearing every buffer
    (``_cleanup_on_error``); any other exception only marks the stream closed and keeps reading.
    """


class _BoundedBuffer(bytearray):
    __slots__ = ("_table", "_stream_id", "beyond_window")

    def extend(self, data: Any) -> None:  # type: ignore[override]
        self._table.check(self, self._stream_id, len(data))
        super().extend(data)

    def __iadd__(self, data: Any) -> "_BoundedBuffer":  # type: ignore[override]
        self.extend(data)
        return self


class _BoundedBuffers(dict):  # type: ignore[type-arg]
    """Yamux's ``stream_id -> bytearray`` table, with every buffer bounded."""

    def __init__(self, conn: Any, limits: ResourceLimits, on_overrun: OverrunHandler) -> None:
        super().__init__()
        self._conn = conn
        self._limits = limits
        self._on_overrun = on_overrun
        self._tripped = False

    def __setitem__(self, stream_id: Any, buffer: Any) -> None:
        bounded = _BoundedBuffer(buffer)
        bounded._table = self
        bounded._stream_id = stream_id
        bounded.beyond_window = 0
        super().__setitem__(stream_id, bounded)

    def check(self, buffer: _BoundedBuffer, stream_id: Any, incoming: int) -> None:
        # Checked before py-libp2p subtracts ``incoming`` from the window. A stream not (yet) in the table
        # gets the initial window every Yamux peer assumes.
        stream = self._conn.streams.get(stream_id)
        window = max(getattr(stream, "recv_window", INITIAL_WINDOW), 0)
        beyond = buffer.beyond_window + max(incoming - window, 0)
        total = sum(len(b) for b in self.values()) + incoming
        if beyond <= self._limits.yamux_stream_buffer_slack and total <= self._limits.yamux_connection_buffer:
            buffer.beyond_window = beyond
            return
        provable = beyond > self._limits.yamux_stream_buffer_slack
        why = (f"{beyond} bytes beyond the receive window on stream {stream_id}" if provable
               else f"{total} bytes buffered on one connection (limit {self._limits.yamux_connection_buffer})")
        if not self._tripped:
            self._tripped = True
            peer = getattr(self._conn, "peer_id", None)
            self._on_overrun(peer.to_base58() if peer is not None else "unknown", why, provable)
        raise WindowOverrun(why)


def bound_yamux_buffers(host: Any, limits: ResourceLimits, on_overrun: OverrunHandler) -> None:
    """Give every Yamux connection ``host`` makes or accepts bounded receive buffers (this host only)."""
    muxers = host.get_network().upgrader.muxer_multistream
    inner = muxers.new_conn

    async def new_conn(conn: Any, peer_id: Any) -> Any:
        muxed = await inner(conn, peer_id)
        buffers = getattr(muxed, "stream_buffers", None)
        if isinstance(buffers, dict) and not isinstance(buffers, _BoundedBuffers):
            bounded = _BoundedBuffers(muxed, limits, on_overrun)
            for stream_id, buffer in buffers.items():
                bounded[stream_id] = buffer
            muxed.stream_buffers = bounded
        return muxed

    muxers.new_conn = new_conn
