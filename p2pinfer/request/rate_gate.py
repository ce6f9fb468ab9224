"""Where a serving handler applies its per-peer rate (:mod:`.limits`): the one I/O step of the rule."""

from __future__ import annotations

import trio

from .limits import OVER_LIMIT_DELAY_S, PeerRateLimiter


async def within_rate(rate: PeerRateLimiter, peer_id: str, own_peer_id: str) -> bool:
    """Count one request from ``peer_id``; True when it is within the peer's rate. A peer over its rate hears
    so only after :data:`~.limits.OVER_LIMIT_DELAY_S` (what bounds a flood on one stream, see :mod:`.limits`).
    Our own requests, looped back, are never limited."""
    if peer_id == own_peer_id or rate.allow(peer_id, trio.current_time()):
        return True
    await trio.sleep(OVER_LIMIT_DELAY_S)
    return False
