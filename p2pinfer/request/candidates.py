"""Which peers get a request's offer: rendezvous (highest-random-weight) hashing on the request ID.

When more peers serve a model than an offer may go to (default 32), each request picks its own subset:
every peer is scored by a hash of (request ID, peer ID) and the lowest scores win. Every peer is equally
likely to be picked, the choice is reproducible by anyone, and the client cannot steer it without changing
the request ID (which also changes the election).
"""

from __future__ import annotations

from typing import Iterable

from ..wire.hashing import tagged_hash

DEFAULT_MAX_CANDIDATES = 32


def rendezvous_score(request_id: bytes, peer_id: str) -> bytes:
    return tagged_hash("p2pinfer/v1/rendezvous", request_id, peer_id.encode())


def select_candidates(request_id: bytes, peer_ids: Iterable[str], limit: int = DEFAULT_MAX_CANDIDATES) -> list[str]:
    """The ``limit`` peers with the lowest rendezvous scores for this request, lowest first."""
    unique = set(peer_ids)
    return sorted(unique, key=lambda p: rendezvous_score(request_id, p))[:limit]
