"""Reputation: a score in [0, 1] from a peer's recent ledger history, and who honest clients exclude.

Pure logic. A score is a smoothed ratio of good to bad events over a sliding window::

    score = (good + PRIOR_GOOD) / (good + bad + PRIOR_GOOD + PRIOR_BAD)

where ``good`` counts verified results and agreeing verifications, and ``bad`` counts penalties weighted
by :data:`BAD_WEIGHTS`. A stranger starts at 2/3; a peer is excluded when its score falls below
:data:`EXCLUDE_BELOW`, or at once and for :data:`FRAUD_EXCLUSION_MS`, whatever its history, when this ledger
holds a fraud record of a kind in :data:`p2pinfer.settlement.EXCLUDING_FRAUD`: fraud its own re-check proved,
or a result a quorum this client asked rejected. Events older than
:data:`WINDOW_MS` are forgotten, so a peer that was merely unlucky (killed twice mid-request) comes back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from .ledger.rules import (
    CREDIT_TOKENS,
    CREDIT_VERIFICATION,
    PENALTY_AGAINST_QUORUM,
    PENALTY_FRAMING,
    PENALTY_REJECTED,
    PENALTY_SILENT,
    Entry,
)

PRIOR_GOOD = 2.0
PRIOR_BAD = 1.0
EXCLUDE_BELOW = 0.5
WINDOW_MS = 24 * 3600 * 1000          # one day of history counts
FRAUD_EXCLUSION_MS = 7 * 24 * 3600 * 1000  # proven fraud excludes the key for a week, whatever else it did

GOOD_KINDS = {CREDIT_TOKENS, CREDIT_VERIFICATION}
BAD_WEIGHTS = {
    PENALTY_SILENT: 1.0,          # two no-shows in a day (with no good work) exclude a stranger
    PENALTY_AGAINST_QUORUM: 5.0,  # one outvoted verdict excludes a stranger
    PENALTY_REJECTED: 20.0,       # also proven fraud, see above
    PENALTY_FRAMING: 20.0,
}


@dataclass(frozen=True)
class Standing:
    score: float
    good: int
    bad: float
    proven_fraud: bool

    @property
    def excluded(self) -> bool:
        return self.proven_fraud or self.score < EXCLUDE_BELOW


def standing(entries: Iterable[Entry], *, now_ms: int, fraud_at_ms: int | None = None) -> Standing:
    """One peer's standing from its entries (only those within the window count)."""
    good, bad = 0, 0.0
    for e in entries:
        if e.at_ms < now_ms - WINDOW_MS:
            continue
        if e.kind in GOOD_KINDS:
            good += 1
        else:
            bad += BAD_WEIGHTS.get(e.kind, 1.0 if e.amount < 0 else 0.0)
    score = (good + PRIOR_GOOD) / (good + bad + PRIOR_GOOD + PRIOR_BAD)
    fraud = fraud_at_ms is not None and fraud_at_ms >= now_ms - FRAUD_EXCLUSION_MS
    return Standing(score, good, bad, fraud)
