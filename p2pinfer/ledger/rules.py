"""Credit and penalty rules: the numbers and the rules now live in :mod:`p2pinfer.settlement`.

This module keeps the ledger's vocabulary (entry kinds as strings, amounts) under its old names.
"""

from __future__ import annotations

from ..settlement import (
    AMOUNTS,
    CREDIT_PER_VERIFICATION,
    CREDIT_PER_VERIFIED_TOKEN,
    PENALTY_FALSE_ACCUSATION,
    PENALTY_NO_ANSWER,
    PENALTY_OUTVOTED,
    PENALTY_REJECTED_RESULT,
    Entry,
    EntryKind,
    entries_for_false_accusation,
    entry_for_no_show,
)

CREDIT_TOKENS = EntryKind.CREDIT_TOKENS
CREDIT_VERIFICATION = EntryKind.CREDIT_VERIFICATION
PENALTY_REJECTED = EntryKind.PENALTY_REJECTED
PENALTY_AGAINST_QUORUM = EntryKind.PENALTY_OUTVOTED
PENALTY_SILENT = EntryKind.PENALTY_NO_ANSWER
PENALTY_FRAMING = EntryKind.PENALTY_FRAMING
KINDS = AMOUNTS

__all__ = [name for name in dir() if not name.startswith("_")]
