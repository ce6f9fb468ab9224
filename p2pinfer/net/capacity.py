"""The capacity behaviour of a node: what we announce, what others announce, sync, DHT providing.

* **Announcing.** :meth:`Capacity.update` records what we serve; :meth:`Capacity.announce_loop` signs and
  publishes a :class:`~p2pinfer.wire.CapacityAnnouncement` on start, on every change (bursts coalesced by
  the gossip rate limit), every ``announce_interval_s``, and once more when the first gossip partner appears
  after a publish that reached none; it keeps each served model's DHT provider
  record up (``p2pinfer.net.dht``).
* **Learning.** Gossip fills the :class:`~p2pinfer.net.announcements.AnnouncementTable` from its validator
  (``p2pinfer.net.gossip``); a joining node also pages through its bootstrap nodes' tables
  (:meth:`Capacity.sync_from`, ``p2pinfer.net.capacity_sync``) and answers others' sync requests
  (:meth:`Capacity.serve_sync`).
* **Lookups** for the request path: :meth:`Capacity.serving` (``Node.candidates`` adds DHT provider hints
  and the NAT layer's reachability memory).
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Sequence

import trio

from ..log import get_logger
from ..wire import CapacityAnnouncement, ModelOffer, encode_signed, now_ms
from .announcements import AnnouncementRejected, AnnouncementTable, ServingEntry
from .capacity_sync import (
    CAPACITY_SYNC,
    MAX_SYNC_PAGES,
    SyncPageError,
    build_sync_page,
    encode_sync_request,
    parse_sync_page,
    parse_sync_request,
)
from .dht import Discovery
from .errors import NetError
from .gossip import CapacityGossip

if TYPE_CHECKING:
    from .node import Node

log = get_logger("p2pinfer.net.capacity")


SYNC_RETRIES = 4  # a join sync that failed is retried after 1, 2, 4 and 8 s (in the background)
JOIN_SYNC_WAIT_S = 5.0  # how long a join waits for its sync; an unfinished sync goes on in the background
SYNC_REPLY_S = 20.0  # a sync page's reply, once its stream is negotiated (see Capacity.sync_page_timeout)


class Capacity:
    def __init__(self, node: "Node", table: AnnouncementTable, gossip: CapacityGossip, discovery: Discovery,
                 stats: Counter[str]) -> None:
        self.node = node
        self.peer_id = node.peer_id
        self.table = table
        self.gossip = gossip
        self.discovery = discovery
        self.stats = stats
        self._models: tuple[ModelOffer, ...] = ()
        self._free_slots = 0
        self._total_slots = 0
        self._seq = 0
        self._changed = trio.Event()
        self._announced_once = trio.Event()
        self.last_announcement: tuple[bytes, int] | None = None  # (signed envelope, expiry ms)
        self.last_addrs: tuple[str, ...] = ()  # the addresses in the last announcement (nat re-announces on change)
        # Our last announcement went to no partner: announce again when the first one appears.
        gossip.on_unheard_partner = lambda: self._changed.set()

    # ---- announcing ---------------------------------------------------------------------------------

    def update(self, *, models: Sequence[ModelOffer] | None = None, free_slots: int | None = None,
               total_slots: int | None = None) -> None:
        if models is not None:
            self._models = tuple(models)
        if free_slots is not None:
            self._free_slots = free_slots
        if total_slots is not None:
            self._total_slots = total_slots
        self._changed.set()

    def build_announcement(self) -> CapacityAnnouncement:
        config = self.node.config
        now = now_ms()
        self._seq = max(now, self._seq + 1)
        return CapacityAnnouncement(
            peer_id=self.peer_id,
            addrs=self.node.announce_addrs(),
            models=self._models,
            free_slots=self._free_slots,
            total_slots=self._total_slots,
            software=config.software[:64],
            seq=self._seq,
            issued_at_ms=now,
            expires_at_ms=now + int(config.announce_ttl_s * 1000),
        )

    async def announce_now(self) -> CapacityAnnouncement:
        announcement = self.build_announcement()
        envelope = encode_signed(self.node.identity, announcement)
        self.last_announcement = (envelope, announcement.expires_at_ms)
        self.last_addrs = tuple(announcement.addrs)
        await self.gossip.publish(envelope)
        self.stats["announcements.sent"] += 1
        log.debug("gossip.announced", seq=announcement.seq, models=len(announcement.models),
                  free_slots=announcement.free_slots)
        return announcement

    async def announce_loop(self, nursery: trio.Nursery) -> None:
        provided: set[bytes] = set()
        while True:
            self._changed = trio.Event()
            digests = {m.digest for m in self._models}
            for digest in digests - provided:
                nursery.start_soon(self.discovery.provide, digest)
            for digest in provided - digests:
                self.discovery.stop_providing(digest)
            provided = digests
            try:
                await self.announce_now()
            except Exception as exc:  # keep announcing; one failed publish is not fatal
                log.warning("gossip.announce_failed", error=repr(exc)[:200])
            self._announced_once.set()
            # Next: on a change, at the refresh interval, or when a publish that went to no partner (none
            # subscribed yet) can reach one: CapacityGossip calls on_unheard_partner when the first appears.
            # Never on a timer of its own: a peer left without partners stays quiet, whatever the load.
            with trio.move_on_after(self.node.config.announce_interval_s):
                await self._changed.wait()

    async def wait_announced(self) -> None:
        await self._announced_once.wait()

    # ---- capacity sync --------------------------------------------------------------------------------

    async def serve_sync(self, peer_id: str, body: bytes) -> bytes:
        cursor = parse_sync_request(body)
        now = now_ms()
        envelopes = [(signed.message.peer_id, signed.to_bytes()) for signed in
                     (self.table.get_signed(a.peer_id, now) for a in self.table.live(now)) if signed is not None]
        own = self.last_announcement
        if own is not None and own[1] > now:
            envelopes.append((self.peer_id, own[0]))
        return build_sync_page(envelopes, after=cursor)

    async def sync_from(self, peer_id: str, *, timeout: float = 5.0) -> int:
        """Pull the live announcements ``peer_id`` holds, page by page; returns how many were new."""
        return (await self._sync_pages(peer_id, timeout))[0]

    @property
    def sync_page_timeout(self) -> float:
        """How long a join sync waits for one page: as long as a stream negotiation may take, plus the reply.

        A short limit here is a wall-clock deadline a loaded machine misses: the page request is then reset
        on the serving peer (which counts ``handler.reset``) and asked again from the start."""
        return self.node.config.stream_negotiation_timeout_s + SYNC_REPLY_S

    async def join_sync(self, peer_id: str, nursery: trio.Nursery, *, wait_s: float = JOIN_SYNC_WAIT_S) -> None:
        """Sync from ``peer_id`` (:meth:`sync_until_done`, in ``nursery``); the join waits for it at most
        ``wait_s``, and a sync that takes longer goes on in the background, not cancelled."""
        finished = trio.Event()

        async def sync_then_signal() -> None:
            try:
                await self.sync_until_done(peer_id)
            finally:
                finished.set()

        nursery.start_soon(sync_then_signal)
        with trio.move_on_after(wait_s):
            await finished.wait()

    async def sync_until_done(self, peer_id: str, *, retries: int = SYNC_RETRIES) -> None:
        """A join's sync, retried with backoff when a page could not be had (the connection dropped, the peer
        refused): a peer that missed its join sync would otherwise lack every announcement made before it
        joined (gossip does not replay them)."""
        delay = 1.0
        for attempt in range(retries + 1):
            if attempt:
                log.debug("sync.retry", peer_id=peer_id, attempt=attempt)
                await trio.sleep(delay)
                delay *= 2
            _, complete = await self._sync_pages(peer_id, self.sync_page_timeout)
            if complete:
                return

    async def _sync_pages(self, peer_id: str, timeout: float) -> tuple[int, bool]:
        """(new announcements, whether every page came)."""
        accepted = received = 0
        complete = False
        cursor = ""
        for _ in range(MAX_SYNC_PAGES):
            try:
                reply = await self.node.request(peer_id, CAPACITY_SYNC, encode_sync_request(cursor), timeout=timeout)
                envelopes, next_cursor = parse_sync_page(reply, after=cursor)
            except (NetError, SyncPageError) as exc:
                self.stats["sync.failed"] += 1
                log.debug("sync.failed", peer_id=peer_id, error=str(exc)[:200])
                break
            received += len(envelopes)
            for data in envelopes:
                try:
                    signed = self.table.offer(data, source_peer_id=None, now_ms=now_ms())
                except AnnouncementRejected as exc:
                    if exc.reason == "stale":  # we already hold it (or a newer one), e.g. from gossip
                        self.stats["sync.known"] += 1
                    else:
                        self.stats[f"sync.rejected.{exc.reason}"] += 1
                        log.debug("sync.rejected", peer_id=peer_id, reason=exc.reason, detail=exc.detail[:200])
                    continue
                if signed.message.peer_id != self.peer_id:
                    accepted += 1
            if not next_cursor:
                complete = True
                break
            cursor = next_cursor
        self.stats["sync.accepted"] += accepted
        log.debug("sync.done", peer_id=peer_id, received=received, accepted=accepted, complete=complete)
        return accepted, complete

    # ---- lookups for the request path ---------------------------------------------------------------

    def serving(self, model_digest: bytes, *, min_free_slots: int = 1,
                include_self: bool = False) -> list[ServingEntry]:
        exclude = () if include_self else (self.peer_id,)
        return self.table.serving(model_digest, now_ms(), min_free_slots=min_free_slots, exclude=exclude)
