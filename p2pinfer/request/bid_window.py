"""When the client stops waiting for bids: the election's closing rule (pure; no I/O, no clock of its own).

The window closes at the first of:

* every candidate offered the request has answered (a bid, a refusal, or a failure such as a dial that
  the node already knows fails: those answer at once);
* :data:`GRACE_S` after the ``enough``-th valid bid arrived, ``enough`` being the quorum-sized set
  (executor + verifiers): from then on, a silent or unreachable candidate costs the request at most the
  grace period;
* the full bid timeout after the offers went out (the upper bound, reached only while fewer than
  ``enough`` valid bids are in).

Fairness (docs/election.md): until ``enough`` bids are in, every bidder has the whole bid timeout; after
that a bidder still counts if its bid arrives within ``GRACE_S`` of the ``enough``-th one. A bidder is
left out only when it is slower than ``enough`` others by more than the grace period.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

GRACE_S = 0.5


class Closed(enum.Enum):
    ALL_ANSWERED = "all-answered"
    GRACE_AFTER_QUORUM = "grace-after-quorum"
    TIMEOUT = "timeout"


@dataclass
class BidWindow:
    """Counts the answers of one offer round; :meth:`close_at` is when to stop waiting."""

    candidates: int
    enough: int
    opened_at: float
    timeout_s: float
    grace_s: float = GRACE_S
    answered: int = 0
    valid: int = 0
    enough_at: float | None = None

    def __post_init__(self) -> None:
        if self.enough <= 0:  # already enough before anyone answered: only the grace period remains
            self.enough_at = self.opened_at

    def record(self, now: float, *, valid: bool) -> None:
        """One candidate answered (``valid``: with a bid that counts toward ``enough``)."""
        self.answered += 1
        if valid:
            self.valid += 1
            if self.enough_at is None and self.valid >= self.enough:
                self.enough_at = now

    def close_at(self) -> float:
        """The time the window closes (at or before ``opened_at`` when every candidate has answered)."""
        if self.answered >= self.candidates:
            return self.opened_at
        limit = self.opened_at + self.timeout_s
        if self.enough_at is not None:
            return min(limit, self.enough_at + self.grace_s)
        return limit

    def reason(self, now: float) -> Closed:
        """Why the window is closed at ``now`` (call once ``now >= close_at()``)."""
        if self.answered >= self.candidates:
            return Closed.ALL_ANSWERED
        if self.enough_at is not None and now >= self.enough_at + self.grace_s:
            return Closed.GRACE_AFTER_QUORUM
        return Closed.TIMEOUT
