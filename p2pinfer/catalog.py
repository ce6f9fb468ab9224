"""What the network offers, from live capacity announcements: one row per model (pure).

Used by ``p2pinfer models network`` and by "did you mean" hints wherever a model name is not known.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

__all__ = ["ModelOnOffer", "did_you_mean", "models_on_offer"]


@dataclass(frozen=True)
class ModelOnOffer:
    name: str
    digest: bytes
    peers: int  # peers announcing it
    free_slots: int  # summed over those peers
    total_slots: int


def models_on_offer(announcements: Iterable[Any]) -> list[ModelOnOffer]:
    """Aggregate announcements (``.models``, ``.free_slots``, ``.total_slots``) by model digest, by name."""
    rows: dict[bytes, list[Any]] = {}
    for a in announcements:
        for offer in {m.digest: m for m in a.models}.values():  # a model counted once per peer
            row = rows.setdefault(offer.digest, [offer.name, 0, 0, 0])
            row[1] += 1
            row[2] += max(0, a.free_slots)
            row[3] += max(0, a.total_slots)
    return sorted((ModelOnOffer(name, digest, peers, free, total) for digest, (name, peers, free, total)
                   in rows.items()), key=lambda m: (m.name, m.digest))


def did_you_mean(name: str, known: Sequence[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest known names, or an empty string."""
    close = difflib.get_close_matches(name, list(known), n=2, cutoff=0.6)
    if not close and name:
        lowered = name.lower()
        close = [k for k in known if lowered in k.lower()][:2]
    if not close:
        return ""
    return " (did you mean " + " or ".join(repr(c) for c in close) + "?)"
