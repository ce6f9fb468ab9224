"""Per-peer rate limits of the serving side: how much work one remote peer may ask for (pure, no I/O).

An offer costs a serving peer a signature check, a VRF proof and a signature; a verify task costs a whole
prefill and a ledger row; a receipt costs signature checks and a ledger write. Anyone who opens a stream can
ask for them, so each is limited per remote peer (the peer ID its Noise handshake proved) with a token
bucket: a peer may send ``burst`` at once, then ``per_second`` on average. Beyond that an offer or verify task is answered ``busy`` (a signed ``Refusal``),
which an honest client treats like a full peer: it backs off and retries; a receipt is refused with an error
(the receipt protocol's only answer is an acknowledgement).

The limits are declared once, here, and documented in docs/network.md ("Limits per peer"):

==================  ===========  =====  =====================================================================
what                per second   burst  why this much
==================  ===========  =====  =====================================================================
offers (bid/1)      20           40     an honest client offers each request once per peer, and re-offers
                                        only after a busy round with exponential back-off
verify tasks        4            16     one per verified request per verifier; a prefill costs ~0.1-0.2 of
                                        generating, so 4/s is far above what one client's requests need
receipts            8            32     one per finished request per peer involved; each is a ledger write
tokenizer queries   8            32     a client fetches a model's tokenizer once (SmolLM2: 12 queries, 3.5 MB);
                                        each answer is at most 512 KiB from memory
status queries      4            16     a failover candidate asks each lower rank once per failover; each answer
                                        is a lookup and at most one signature
==================  ===========  =====  =====================================================================

A refusal for exceeding the rate is answered only after :data:`OVER_LIMIT_DELAY_S`: an attacker flooding
one stream then gets at most one answer per stream per that delay, and the CPU its flood costs the peer
(stream crypto and framing, which cost more than the refusal itself) stays bounded by the number of
streams it may open (see the network's per-peer stream limits). Honest clients within the limits never
wait.

At most :data:`MAX_TRACKED_PEERS` peers are tracked; the one least recently seen is forgotten first (it
starts again with a full bucket, which costs an attacker a fresh connection per identity).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

MAX_TRACKED_PEERS = 4096
OVER_LIMIT_DELAY_S = 1.0


@dataclass(frozen=True)
class Rate:
    """``per_second`` sustained, ``burst`` at once (the bucket's size)."""

    per_second: float
    burst: int

    def __post_init__(self) -> None:
        if not (self.per_second > 0 and math.isfinite(self.per_second)) or self.burst < 1:
            raise ValueError("a rate needs per_second > 0 (finite) and burst >= 1")


OFFER_RATE = Rate(per_second=20.0, burst=40)
VERIFY_RATE = Rate(per_second=4.0, burst=16)
RECEIPT_RATE = Rate(per_second=8.0, burst=32)
TOKENIZER_RATE = Rate(per_second=8.0, burst=32)
STATUS_RATE = Rate(per_second=4.0, burst=16)


class TokenBucket:
    """Holds up to ``rate.burst`` tokens, refilled at ``rate.per_second``; one request takes one token.

    Time is passed in (seconds on any monotonic clock) so the rule is testable without waiting.
    """

    __slots__ = ("rate", "tokens", "updated")

    def __init__(self, rate: Rate, now: float) -> None:
        self.rate = rate
        self.tokens = float(rate.burst)
        self.updated = now

    def _refill(self, now: float) -> None:
        if now > self.updated:  # a clock that goes backwards never adds tokens
            self.tokens = min(float(self.rate.burst), self.tokens + (now - self.updated) * self.rate.per_second)
            self.updated = now

    def take(self, now: float) -> bool:
        """Take one token if there is one; False means over the limit."""
        self._refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def retry_after(self, now: float) -> float:
        """Seconds until a token is available (0 if one is)."""
        self._refill(now)
        return max(0.0, (1.0 - self.tokens) / self.rate.per_second)


class PeerRateLimiter:
    """One :class:`TokenBucket` per peer, for at most ``max_peers`` peers (least recently seen forgotten)."""

    def __init__(self, rate: Rate, *, max_peers: int = MAX_TRACKED_PEERS) -> None:
        if max_peers < 1:
            raise ValueError("max_peers must be >= 1")
        self.rate = rate
        self.max_peers = max_peers
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, peer: str, now: float) -> bool:
        """Count one request from ``peer`` at ``now``; False when it exceeds the peer's rate."""
        bucket = self._buckets.get(peer)
        if bucket is None:
            bucket = self._buckets[peer] = TokenBucket(self.rate, now)
            while len(self._buckets) > self.max_peers:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(peer)
        return bucket.take(now)

    def retry_after(self, peer: str, now: float) -> float:
        bucket = self._buckets.get(peer)
        return 0.0 if bucket is None else bucket.retry_after(now)


__all__ = ["Rate", "TokenBucket", "PeerRateLimiter", "OFFER_RATE", "VERIFY_RATE", "RECEIPT_RATE", "STATUS_RATE",
           "MAX_TRACKED_PEERS", "OVER_LIMIT_DELAY_S"]
