"""Send one signed message to several peers at once and count who took it (bid sets, receipts)."""

from __future__ import annotations

from typing import Iterable

import trio

from ..identity import peer_id_from_public_key
from ..log import get_logger
from ..net import NetError, Node
from ..net.protocol import Protocol

log = get_logger("p2pinfer.client")


async def send_to_each(node: Node, protocol: str | Protocol, data: bytes, keys: Iterable[bytes], *,
                       timeout: float, max_frame: int, grace: float, undelivered_event: str) -> int:
    """Request ``protocol`` with ``data`` from each key's peer concurrently; returns how many answered.

    A peer that cannot be reached is logged (``undelivered_event``) and skipped: delivery is best effort, and
    the whole round is bounded by ``timeout + grace``.
    """
    delivered = 0

    async def send(key: bytes) -> None:
        nonlocal delivered
        try:
            await node.request(peer_id_from_public_key(key), protocol, data, timeout=timeout, max_frame=max_frame)
            delivered += 1
        except NetError as exc:
            log.debug(undelivered_event, peer_id=peer_id_from_public_key(key), error=str(exc)[:200])

    with trio.move_on_after(timeout + grace):
        async with trio.open_nursery() as nursery:
            for key in dict.fromkeys(keys):
                nursery.start_soon(send, key)
    return delivered
