"""The verification quorum's rules now live in :mod:`p2pinfer.settlement` (decided once, in one module).

This module keeps the old import path working for callers outside the request path.
"""

from __future__ import annotations

from .settlement import DEFAULT_QUORUM, Outcome, Tally, executor_to_blame, majority, pick_verifiers, tally

ACCEPTED = Outcome.ACCEPTED
REJECTED = Outcome.REJECTED
UNVERIFIED = Outcome.UNVERIFIED

__all__ = ["ACCEPTED", "REJECTED", "UNVERIFIED", "DEFAULT_QUORUM", "Tally", "executor_to_blame", "majority",
           "pick_verifiers", "tally"]
