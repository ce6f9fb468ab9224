"""Small helpers for the words of user-facing messages (pure)."""

from __future__ import annotations


def plural(count: int, word: str, many: str | None = None) -> str:
    """``1 verifier``, ``3 verifiers`` (``many`` for irregular plurals): a count that may be 1 never reads
    "1 peers"."""
    return f"{count} {word if count == 1 else many or word + 's'}"
