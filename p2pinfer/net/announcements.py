"""Capacity announcements: validation rules and the table of live announcements (pure logic, no I/O).

An announcement is a :class:`~p2pinfer.wire.messages.CapacityAnnouncement` in a signed envelope. It is
accepted only if all of these hold, checked in this order (the first failure is the drop reason):

===================  ========================================================================
reason               rule
===================  ========================================================================
``oversized``        the gossip payload is at most :data:`MAX_ANNOUNCEMENT_BYTES`
``malformed`` ...    it decodes as a canonical envelope of type ``capacity`` (the reason is the
                     wire error's: ``malformed``, ``non-canonical``, ``schema``, ``unknown-type``,
                     ``version``, ``bad-signature``, ...)
``signer-mismatch``  ``peer_id`` is the envelope signer's peer ID
``source-mismatch``  the GossipSub message source (itself signed by pubsub) is that same peer
``bad-addr``         every address is a dialable multiaddr: ``/ip4|ip6|dns*/<host>/tcp|udp/<port>``,
                     optionally ``/quic-v1`` or a relay circuit; no wildcard host, no port 0
``bad-slots``        ``free_slots`` <= ``total_slots``
``duplicate-model``  no model digest appears twice
``expired`` /        the validity window holds (:func:`p2pinfer.wire.replay.check_window`):
``future`` /         not expired, issued at most 30 s in the future, lifetime at most 10 min
``bad-window``
``stale``            ``seq`` is strictly greater than the last accepted from that peer
``host-quota``       fewer than :data:`MAX_PEERS_PER_HOST` other peers announce the same host (IPv4
                     address, IPv6 /64 or DNS name of the first address): one machine cannot fill the
                     table with keys
===================  ========================================================================

A replayed announcement is therefore dropped as ``stale`` while its original is live and as ``expired``
afterwards. Sequence numbers are remembered per peer until that peer's last announcement expires; peers
use ``max(now_ms, last_seq + 1)`` as their next ``seq`` so that a restarted peer's first announcement
replaces the one it made before the restart.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Iterable

from ..wire import CapacityAnnouncement, ModelOffer, ReplayError, Signed, WireError, check_window, decode_signed
from .addrs import dialable_problem
from ..wire.replay import DEFAULT_MAX_CLOCK_SKEW_MS, DEFAULT_MAX_LIFETIME_MS

# 32 model offers of ~300 bytes and 16 addresses of up to 256 bytes stay below 16 KiB in an envelope.
MAX_ANNOUNCEMENT_BYTES = 16 * 1024

REJECT_REASONS = (
    "oversized", "malformed", "non-canonical", "extension-type", "too-deep", "schema", "unknown-type",
    "version", "bad-signature", "signer-mismatch", "source-mismatch", "bad-addr", "bad-slots", "duplicate-model",
    "expired", "future", "bad-window", "stale", "host-quota",
)
MAX_PEERS_PER_HOST = 64   # announcements tracked per announced host (IPv4 address, IPv6 /64, DNS name)

# Reasons that prove the peer who forwarded the bytes broke the rules (an honest forwarder validates first
# and would have dropped them). Timing reasons and version/type skew are not the forwarder's fault.
SENDER_FAULT_REASONS = frozenset({
    "oversized", "malformed", "non-canonical", "extension-type", "too-deep", "schema", "bad-signature",
    "signer-mismatch", "source-mismatch", "bad-addr", "bad-slots", "duplicate-model", "bad-window",
})


class AnnouncementRejected(Exception):
    """An announcement failed validation; ``reason`` is one of :data:`REJECT_REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


def _window_reason(exc: ReplayError) -> str:
    text = str(exc)
    if "expired" in text:
        return "expired"
    if "future" in text:
        return "future"
    return "bad-window"


def verify_announcement(
    data: bytes,
    *,
    source_peer_id: str | None,
    now_ms: int,
    max_skew_ms: int = DEFAULT_MAX_CLOCK_SKEW_MS,
    max_lifetime_ms: int = DEFAULT_MAX_LIFETIME_MS,
) -> Signed[CapacityAnnouncement]:
    """Check everything about one announcement that does not depend on what was seen before."""
    if len(data) > MAX_ANNOUNCEMENT_BYTES:
        raise AnnouncementRejected("oversized", f"{len(data)} bytes > {MAX_ANNOUNCEMENT_BYTES}")
    try:
        signed = decode_signed(data, expect=CapacityAnnouncement, max_size=MAX_ANNOUNCEMENT_BYTES)
    except WireError as exc:
        raise AnnouncementRejected(exc.reason, str(exc)) from None
    announcement: CapacityAnnouncement = signed.message
    signer = signed.signer_peer_id
    if announcement.peer_id != signer:
        raise AnnouncementRejected("signer-mismatch", f"peer_id {announcement.peer_id} signed by {signer}")
    if source_peer_id is not None and source_peer_id != signer:
        raise AnnouncementRejected("source-mismatch", f"announcement of {signer} published by {source_peer_id}")
    check_fields(announcement)
    try:
        check_window(
            announcement.issued_at_ms, announcement.expires_at_ms, now=now_ms,
            max_skew_ms=max_skew_ms, max_lifetime_ms=max_lifetime_ms,
        )
    except ReplayError as exc:
        raise AnnouncementRejected(_window_reason(exc), str(exc)) from None
    return signed


def check_fields(announcement: CapacityAnnouncement) -> None:
    """Semantic checks beyond the schema's types and sizes (which the codec already enforced)."""
    for addr in announcement.addrs:
        problem = dialable_problem(addr)
        if problem is not None:
            raise AnnouncementRejected("bad-addr", f"{addr[:80]!r}: {problem}")
    if announcement.free_slots > announcement.total_slots:
        raise AnnouncementRejected("bad-slots", f"{announcement.free_slots} free of {announcement.total_slots}")
    digests = [m.digest for m in announcement.models]
    if len(set(digests)) != len(digests):
        raise AnnouncementRejected("duplicate-model", "a model digest is announced twice")


def host_key(addrs: Iterable[str]) -> str:
    """The host an announcement's first address names: an IPv4 address, an IPv6 /64, a DNS name, or ""."""
    for addr in addrs:
        parts = addr.split("/")
        if len(parts) >= 3 and parts[1] in ("ip4", "dns", "dns4", "dns6"):
            return f"{parts[1]}:{parts[2].lower()}"
        if len(parts) >= 3 and parts[1] == "ip6":
            try:
                network = ipaddress.IPv6Network(f"{parts[2]}/64", strict=False)
            except ValueError:
                return f"ip6:{parts[2]}"
            return f"ip6:{network.network_address}/64"
    return ""


@dataclass(frozen=True)
class ServingEntry:
    """A peer that serves a model, from its latest announcement."""

    peer_id: str
    addrs: tuple[str, ...]
    offer: ModelOffer
    free_slots: int
    total_slots: int
    expires_at_ms: int
    seq: int


class AnnouncementTable:
    """The latest live announcement of every peer. Not thread-safe; used from one trio task at a time."""

    def __init__(self, max_peers: int = 10_000, max_per_host: int = MAX_PEERS_PER_HOST) -> None:
        self.max_peers = max_peers
        self.max_per_host = max_per_host
        self._by_peer: dict[str, Signed[CapacityAnnouncement]] = {}
        self._peers_by_host: dict[str, set[str]] = {}

    def __len__(self) -> int:
        return len(self._by_peer)

    def __contains__(self, peer_id: object) -> bool:
        return peer_id in self._by_peer

    def last_seq(self, peer_id: str) -> int | None:
        entry = self._by_peer.get(peer_id)
        return None if entry is None else entry.message.seq

    def check_newer(self, announcement: CapacityAnnouncement, now_ms: int) -> None:
        self.expire(now_ms)
        last = self.last_seq(announcement.peer_id)
        if last is not None and announcement.seq <= last:
            raise AnnouncementRejected("stale", f"seq {announcement.seq} <= last accepted {last}")

    def accept(self, signed: Signed[CapacityAnnouncement], now_ms: int) -> None:
        """Store ``signed`` (already verified) if it is newer than what we have; else raise ``stale``."""
        self.check_newer(signed.message, now_ms)
        peer_id = signed.message.peer_id
        host = host_key(signed.message.addrs)
        holders = self._peers_by_host.get(host, set())
        if peer_id not in holders and len(holders) >= self.max_per_host:
            # One machine (one IP, one /64) cannot fill the table with keys: first come, first kept; the
            # quota frees up as those announcements expire.
            raise AnnouncementRejected("host-quota", f"{len(holders)} peers already announce host {host!r}")
        if peer_id not in self._by_peer and len(self._by_peer) >= self.max_peers:
            # Full: evict whichever announcement expires first (bounded memory against Sybil floods).
            victim = min(self._by_peer, key=lambda p: self._by_peer[p].message.expires_at_ms)
            self._forget(victim)
        previous = self._by_peer.get(peer_id)
        if previous is not None:
            self._forget(peer_id)
        self._by_peer[peer_id] = signed
        self._peers_by_host.setdefault(host, set()).add(peer_id)

    def _forget(self, peer_id: str) -> None:
        entry = self._by_peer.pop(peer_id, None)
        if entry is None:
            return
        host = host_key(entry.message.addrs)
        holders = self._peers_by_host.get(host)
        if holders is not None:
            holders.discard(peer_id)
            if not holders:
                del self._peers_by_host[host]

    def offer(self, data: bytes, *, source_peer_id: str | None, now_ms: int) -> Signed[CapacityAnnouncement]:
        """Verify and accept gossip bytes in one step; raises :class:`AnnouncementRejected`."""
        signed = verify_announcement(data, source_peer_id=source_peer_id, now_ms=now_ms)
        self.accept(signed, now_ms)
        return signed

    def expire(self, now_ms: int) -> list[str]:
        """Forget announcements whose validity has ended; returns the peer IDs forgotten."""
        gone = [p for p, s in self._by_peer.items() if s.message.expires_at_ms <= now_ms]
        for peer_id in gone:
            self._forget(peer_id)
        return gone

    def get(self, peer_id: str, now_ms: int) -> CapacityAnnouncement | None:
        entry = self._by_peer.get(peer_id)
        if entry is None or entry.message.expires_at_ms <= now_ms:
            return None
        return entry.message

    def get_signed(self, peer_id: str, now_ms: int) -> Signed[CapacityAnnouncement] | None:
        entry = self._by_peer.get(peer_id)
        if entry is None or entry.message.expires_at_ms <= now_ms:
            return None
        return entry

    def live(self, now_ms: int) -> list[CapacityAnnouncement]:
        return [s.message for s in self._by_peer.values() if s.message.expires_at_ms > now_ms]

    def serving(self, digest: bytes, now_ms: int, *, min_free_slots: int = 1,
                exclude: Iterable[str] = ()) -> list[ServingEntry]:
        """Peers whose live announcement offers model ``digest`` with at least ``min_free_slots`` free.

        Sorted by most free slots first, then by peer ID (deterministic).
        """
        excluded = set(exclude)
        found = []
        for a in self.live(now_ms):
            if a.peer_id in excluded or a.free_slots < min_free_slots:
                continue
            for offer in a.models:
                if offer.digest == digest:
                    found.append(ServingEntry(a.peer_id, a.addrs, offer, a.free_slots, a.total_slots,
                                             a.expires_at_ms, a.seq))
                    break
        found.sort(key=lambda s: (-s.free_slots, s.peer_id))
        return found
