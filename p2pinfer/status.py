"""What a running peer reports about itself: the JSON behind ``/v1/p2pinfer/status`` and ``p2pinfer status``.

Plain data only (JSON types), built from the node's announcement table and counters, the task server's
counters and recent tasks, and the gateway's recent requests. Reputation, credits and penalties come from
this peer's ledger (``None`` when no ledger is given).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Mapping

from . import __version__
from .wire import now_ms

if TYPE_CHECKING:
    from .ledger import Ledger
    from .metrics import PeerMetrics
    from .net import Node
    from .request.server import TaskServer

STATUS_VERSION = 1


def is_departed_client(announcement: Any, connected: set[str]) -> bool:
    """A client (it announces no model) we are no longer connected to: it has left, though its last
    announcement has not expired yet."""
    return not announcement.models and announcement.peer_id not in connected


def status_snapshot(node: "Node", *, server: "TaskServer | None" = None, metrics: "PeerMetrics | None" = None,
                    urls: Mapping[str, str] | None = None, ledger: "Ledger | None" = None) -> dict[str, Any]:
    from .identity import public_key_from_peer_id

    now = now_ms()

    def reputation(peer_id: str) -> dict[str, Any] | None:
        if ledger is None:
            return None
        standing = ledger.standing(public_key_from_peer_id(peer_id), now_ms=now)
        return {"score": round(standing.score, 3), "excluded": standing.excluded,
                "proven_fraud": standing.proven_fraud}

    peers = []
    connected = set(node.connected_peers())
    for a in sorted(node.table.live(now), key=lambda a: a.peer_id):
        if a.peer_id == node.peer_id or is_departed_client(a, connected):
            continue
        peers.append({
            "peer_id": a.peer_id,
            "models": [{"name": m.name, "digest": m.digest.hex(), "decode_tokens_per_s": round(m.decode_tokens_per_s, 1)}
                       for m in a.models],
            "free_slots": a.free_slots,
            "total_slots": a.total_slots,
            "software": a.software,
            "expires_in_s": round((a.expires_at_ms - now) / 1000, 1),
            "reputation": reputation(a.peer_id),
        })
    own: dict[str, Any] = {
        "peer_id": node.peer_id,
        "role": node.config.role,
        "version": __version__,
        "addrs": node.addrs,
        "connected_peers": len(node.connected_peers()),
        "urls": dict(urls or {}),
        "uptime_s": round(time.time() - metrics.started_at, 1) if metrics else None,
        "credits": None,
        "penalties": None,
        "gossip": dict(node.gossip.counters),
    }
    if ledger is not None:
        mine = ledger.entries(public_key_from_peer_id(node.peer_id))
        own["credits"] = sum(e.amount for e in mine if e.amount > 0)
        own["penalties"] = sum(-e.amount for e in mine if e.amount < 0)
    if server is not None:
        own["models"] = [{"name": m.name, "digest": d.hex()} for d, m in server.models.items()]
        own["slots"] = {"free": server.free_slots, "total": server.slots}
        own["counters"] = dict(server.counters)
    recent_tasks = [{"request_id": t.request_id, "client": t.client, "model": t.model, "tokens": t.tokens,
                     "outcome": t.outcome, "started_at_ms": t.started_at_ms,
                     "duration_s": round((t.finished_at_ms - t.started_at_ms) / 1000, 3)}
                    for t in (server.recent if server is not None else ())]
    recent_requests = [r.to_json() for r in (metrics.recent if metrics is not None else ())]
    return {"status_version": STATUS_VERSION, "generated_at_ms": now, "peer": own, "known_peers": peers,
            "recent_tasks": recent_tasks[::-1], "recent_requests": recent_requests[::-1]}
