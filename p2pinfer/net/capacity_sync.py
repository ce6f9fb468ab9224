"""Capacity sync: a joining node pages through the live announcements a bootstrap node holds (pure codec).

Gossip only carries announcements made after a node subscribed, so a newcomer asks its bootstrap nodes
for what they hold. Each signed envelope in a reply is then checked exactly like gossip (signature,
window, sequence): a lying server can withhold announcements but not forge one.

Wire format (canonical msgpack, protocol ``/p2pinfer/capacity-sync/2``):

* request: ``{"after": <peer ID string, "" for the first page>}``
* reply:   ``{"envelopes": [<signed announcement bytes>, ...], "next": <cursor, "" when done>}``

Envelopes are ordered by announcing peer ID; a page holds the announcements of peers strictly after the
cursor, as many as fit in :data:`MAX_PAGE_BYTES` (so every page fits its frame however large the
announcements are) and at most :data:`MAX_PAGE_ENTRIES`. The client follows ``next`` for at most
:data:`MAX_SYNC_PAGES` pages and rejects a cursor that does not move forward.
"""

from __future__ import annotations

from typing import Iterable

from ..wire import WireError, codec
from .announcements import MAX_ANNOUNCEMENT_BYTES
from .protocol import Exchange, Protocol

MAX_SYNC_FRAME = 1 << 20
PAGE_OVERHEAD = 1024                       # msgpack map, keys, cursor, per-entry headers slack
MAX_PAGE_BYTES = MAX_SYNC_FRAME - 1 - PAGE_OVERHEAD   # minus the status byte
MAX_PAGE_ENTRIES = 256
MAX_SYNC_PAGES = 64                         # 64 x 256 = 16 384 announcements, above the table's 10 000
MAX_CURSOR_CHARS = 64

CAPACITY_SYNC = Protocol("/p2pinfer/capacity-sync/2", MAX_SYNC_FRAME, exchange=Exchange.RAW,
                         summary='{"after": cursor} -> {"envelopes": [signed announcement], "next": cursor}')


class SyncPageError(Exception):
    """A sync request or page that does not follow the format above."""


def encode_sync_request(after: str) -> bytes:
    return codec.encode({"after": after})


def parse_sync_request(body: bytes) -> str:
    try:
        request = codec.decode(body, max_size=256)
    except WireError as exc:
        raise SyncPageError(f"sync request is not msgpack: {exc}") from None
    after = request.get("after") if isinstance(request, dict) else None
    if not isinstance(after, str) or len(after) > MAX_CURSOR_CHARS:
        raise SyncPageError("sync request needs 'after': a peer ID string (or '')")
    return after


def build_sync_page(envelopes: Iterable[tuple[str, bytes]], *, after: str) -> bytes:
    """The page of ``(peer_id, envelope)`` pairs after cursor ``after`` that fits the frame."""
    page: list[bytes] = []
    size = 0
    next_cursor = ""
    last = after
    for peer_id, data in sorted((p, d) for p, d in envelopes if p > after):
        if len(page) >= MAX_PAGE_ENTRIES or size + len(data) + 5 > MAX_PAGE_BYTES:
            next_cursor = last
            break
        page.append(data)
        size += len(data) + 5
        last = peer_id
    return codec.encode({"envelopes": page, "next": next_cursor})


def parse_sync_page(reply: bytes, *, after: str) -> tuple[list[bytes], str]:
    """``(envelopes, next cursor)`` from a reply; raises :class:`SyncPageError` on anything malformed."""
    try:
        page = codec.decode(reply, max_size=MAX_SYNC_FRAME)
    except WireError as exc:
        raise SyncPageError(f"sync page is not msgpack: {exc}") from None
    if not isinstance(page, dict) or set(page) != {"envelopes", "next"}:
        raise SyncPageError("sync page must be a map of 'envelopes' and 'next'")
    envelopes, next_cursor = page["envelopes"], page["next"]
    if not isinstance(envelopes, list) or len(envelopes) > MAX_PAGE_ENTRIES:
        raise SyncPageError(f"'envelopes' must be a list of at most {MAX_PAGE_ENTRIES}")
    if not all(isinstance(e, bytes) and len(e) <= MAX_ANNOUNCEMENT_BYTES for e in envelopes):
        raise SyncPageError("every envelope must be bytes of at most 16 KiB")
    if not isinstance(next_cursor, str) or len(next_cursor) > MAX_CURSOR_CHARS:
        raise SyncPageError("'next' must be a peer ID string")
    if next_cursor and next_cursor <= after:
        raise SyncPageError("'next' does not move forward")
    return envelopes, next_cursor
