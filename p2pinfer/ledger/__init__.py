"""The local ledger: signed receipts and verdicts, credits and penalties, fraud records (SQLite, WAL)."""

from .rules import (
    CREDIT_PER_VERIFICATION,
    CREDIT_PER_VERIFIED_TOKEN,
    PENALTY_FALSE_ACCUSATION,
    PENALTY_NO_ANSWER,
    PENALTY_OUTVOTED,
    PENALTY_REJECTED_RESULT,
    Entry,
    entries_for_false_accusation,
    entry_for_no_show,
)
from .store import DISPROVEN, LEDGER_FILE, PROVEN, PROVEN_INHERITED, QUORUM_REJECTED, UNCHECKED, FraudRecord, Ledger, LedgerError

__all__ = [name for name in dir() if not name.startswith("_")]
