"""Encrypted writes that are never cut short by a caller's timeout: a cancelled write cannot break a connection.

Upstream bug (py-libp2p 0.8.1): Noise encrypts each message with the next nonce, then awaits the socket
(``NoiseTransportReadWriter.write_msg``); Yamux writes each frame with a plain ``await secured_conn.write``
under the connection's write lock. A cancellation that lands between the two (any caller's timeout: a
request deadline, a multistream negotiation limit, a reset bounded by ``move_on_after``) leaves the message
encrypted but never sent (or half sent): the other end's next decryption uses a nonce we skipped, fails
("Failed authentication of message"), and it drops the whole connection, every stream on it included. Under
load timeouts fire often, so connections died at random: pubsub streams were reset mid-negotiation
("handshake write failed"), a node missed gossip for tens of seconds (the ten-peer test), requests on other
streams of the same connection failed. tests/net/test_cancelled_write.py reproduces it.

:func:`make_writes_whole` wraps the upgrader on one host (no global patching): every secured connection's
``write`` runs shielded from the caller's cancellation, so a message that was encrypted is also sent whole. A
caller cancelled before its write starts gets its ``Cancelled`` at once (nothing was encrypted); one
cancelled while its write is under way sees the cancellation at its next checkpoint, after the write. So a
write to a peer that does not read its socket can outlast the caller's timeout (only then: Yamux flow
control waits for the window before anything is encrypted, and that wait stays cancellable), up to
:data:`WRITE_LIMIT_S`; then the connection is closed, which a cut-off write would have broken anyway.
"""

from __future__ import annotations

from typing import Any

import trio
from libp2p.io.exceptions import ConnectionClosedError

from ..log import get_logger

log = get_logger("p2pinfer.net.whole_writes")

# How long one write may wait for the peer to take its bytes once it is under way (the caller's own timeout
# no longer applies). Loopback and LAN writes take microseconds; this only bounds a peer that stopped reading.
WRITE_LIMIT_S = 30.0


def make_writes_whole(host: Any) -> None:
    """Every secured connection ``host`` makes or accepts writes whole messages (see the module docstring)."""
    muxers = host.get_network().upgrader.muxer_multistream
    inner = muxers.new_conn

    async def new_conn(conn: Any, peer_id: Any) -> Any:
        shield_writes(conn)
        return await inner(conn, peer_id)

    muxers.new_conn = new_conn


def shield_writes(conn: Any) -> None:
    """Make ``conn.write`` (this instance only) complete whole, or close ``conn`` after :data:`WRITE_LIMIT_S`."""
    if getattr(conn, "_p2pinfer_whole_writes", False):
        return
    write = conn.write

    async def whole_write(data: bytes) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()  # a caller cancelled already: nothing encrypted, nothing lost
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + WRITE_LIMIT_S
            await write(data)
        if scope.cancelled_caught:  # part of a message may be on the wire: the connection cannot go on
            log.info("connection.write_stuck", limit_s=WRITE_LIMIT_S, bytes=len(data))
            with trio.CancelScope(shield=True):
                with trio.move_on_after(1):
                    try:
                        await conn.close()
                    except Exception:
                        pass
            raise ConnectionClosedError(f"the peer took no data for {WRITE_LIMIT_S} s; connection closed")

    conn.write = whole_write
    conn._p2pinfer_whole_writes = True
