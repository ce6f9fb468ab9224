"""Per-peer fault book: what each remote peer provably did wrong, and who is banned (pure logic, no I/O).

A *fault* is something only the sender can be blamed for: bytes that do not parse on a protocol it chose
to speak, a Yamux window it overran, gossip it forwarded although it fails validation every honest peer
runs before forwarding. Timeouts, resets and busy refusals are never faults (a loaded machine or a lossy
network causes them too).

Each fault adds its :class:`FaultKind` weight to the peer's score; scores decay exponentially (half-life
:data:`FAULT_HALF_LIFE_S`), and a peer whose score reaches :data:`BAN_SCORE` is banned for
:data:`BAN_S`: its connection is closed and new connections from it are closed on arrival. A severe fault
(a window overrun: nothing honest does that) bans at once.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

BAN_SCORE = 10.0
BAN_S = 600.0
FAULT_HALF_LIFE_S = 120.0
MAX_TRACKED_PEERS = 10_000


class FaultKind(enum.Enum):
    """What a peer did; the value is the reason code logged and counted (``fault.<reason>``)."""

    MALFORMED_STREAM = "malformed-stream"      # bytes on a protocol stream that do not parse
    INVALID_GOSSIP = "invalid-gossip"          # forwarded gossip that fails validation
    WINDOW_OVERRUN = "window-overrun"          # Yamux DATA beyond the receive window we granted

    @property
    def weight(self) -> float:
        return _WEIGHTS[self]


_WEIGHTS = {
    FaultKind.MALFORMED_STREAM: 2.0,
    FaultKind.INVALID_GOSSIP: BAN_SCORE / 2.5,  # the 3rd within minutes bans (gossip.INVALID_GOSSIP_LIMIT)
    FaultKind.WINDOW_OVERRUN: BAN_SCORE,
}


@dataclass
class _Entry:
    score: float
    at: float


class FaultBook:
    """Decaying fault scores and bans, keyed by peer ID. Times are seconds on any monotonic clock."""

    def __init__(self, *, ban_score: float = BAN_SCORE, ban_s: float = BAN_S,
                 half_life_s: float = FAULT_HALF_LIFE_S, max_peers: int = MAX_TRACKED_PEERS) -> None:
        self.ban_score = ban_score
        self.ban_s = ban_s
        self.half_life_s = half_life_s
        self.max_peers = max_peers
        self._scores: dict[str, _Entry] = {}
        self._banned_until: dict[str, float] = {}

    def score(self, peer_id: str, now: float) -> float:
        entry = self._scores.get(peer_id)
        if entry is None:
            return 0.0
        return entry.score * math.pow(0.5, max(now - entry.at, 0.0) / self.half_life_s)

    def record(self, peer_id: str, kind: FaultKind, now: float) -> bool:
        """Add a fault; True when this fault newly bans the peer."""
        score = self.score(peer_id, now) + kind.weight
        if peer_id not in self._scores and len(self._scores) >= self.max_peers:
            self._forget_lowest(now)
        self._scores[peer_id] = _Entry(score, now)
        if score >= self.ban_score and not self.is_banned(peer_id, now):
            if len(self._banned_until) >= self.max_peers:
                self._expire_bans(now)
            if len(self._banned_until) >= self.max_peers:  # still full: the ban ending soonest goes
                del self._banned_until[min(self._banned_until, key=self._banned_until.__getitem__)]
            self._banned_until[peer_id] = now + self.ban_s
            return True
        return False

    def is_banned(self, peer_id: str, now: float) -> bool:
        until = self._banned_until.get(peer_id)
        if until is None:
            return False
        if until <= now:
            del self._banned_until[peer_id]
            return False
        return True

    def banned(self, now: float) -> list[str]:
        self._expire_bans(now)
        return list(self._banned_until)

    def _expire_bans(self, now: float) -> None:
        for peer_id in [p for p, t in self._banned_until.items() if t <= now]:
            del self._banned_until[peer_id]

    def _forget_lowest(self, now: float) -> None:
        victim = min(self._scores, key=lambda p: self.score(p, now))
        del self._scores[victim]
