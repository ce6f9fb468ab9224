"""What the network page shows: the JSON behind ``GET /v1/p2pinfer/network`` (plain JSON types only).

Three parts, each from what this peer itself knows or can check:

* ``peers``: this peer ("you": true) and every peer with a live capacity announcement: models, free slots,
  reachability (an open connection now, or known through gossip only) and reputation in this peer's ledger;
* ``requests``: the requests this peer took part in (sent through its gateway, bid on, executed, or verified),
  newest first, each with its executor, the VRF ranking re-checked here (``elect`` verifies every proof again),
  the verifiers' signed verdicts and the quorum's outcome. Sources: the gateway's own completions, the signed
  receipts in this peer's ledger, and the clients' signed ``BidSet`` elections this peer received as a bidder
  or executor. A receipt's own bid set and verdicts are decoded and their signatures checked before they are
  shown (a receipt is another party's bytes); a bidder that got no receipt sees the ranking but no outcome;
* ``ledger``: this peer's own credits and penalties, with units, and its balance over time.

The election and verdict descriptions are pure functions (:func:`describe_election`, :func:`describe_verdicts`);
:func:`ledger_view` does SQLite reads and runs in a worker thread.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Collection, Iterable, Mapping, Sequence

from ..election import NOT_ELIGIBLE, elect
from ..identity import peer_id_from_public_key
from ..status import is_departed_client
from ..wire import Bid, BidSet, Receipt, Verdict, WireError, decode_signed, now_ms
from ..wire.messages import MAX_BID_SET_BYTES

if TYPE_CHECKING:
    from ..ledger import Ledger
    from ..request.server import SeenElection

NETWORK_PATH = "/v1/p2pinfer/network"
RECENT_REQUESTS = 24        # requests shown
LEDGER_SERIES_POINTS = 200  # ledger entries behind the credits sparkline
LEDGER_RECENT_ENTRIES = 12  # entries listed under it

CREDIT_UNIT = "credit"
CREDIT_DOC = ("one credit = one output token that a verification quorum accepted; verifiers earn 4 credits per "
              "verdict that agrees with the decision; penalties are in the same unit. This is this peer's own "
              "ledger: what it booked from the receipts it holds, not a network-wide balance.")


@dataclass(frozen=True)
class GatewayRequest:
    """A completion the gateway received, kept for the page: enough to re-check and describe it."""

    request_id: bytes
    model: str
    at_ms: int
    executor: str
    tokens: int
    epoch_seed: bytes
    bids: tuple[Bid, ...]
    outcome: str  # the verification outcome (accepted, rejected, unverified, skipped)
    verifiers: tuple[str, ...]
    verdicts: tuple[Any, ...]  # Signed[Verdict], already checked by the client's tally
    refusals: tuple[tuple[str, str], ...]


def vrf_position(output: bytes) -> float:
    """Where a VRF output lies in [0, 1): its first 6 bytes as a fraction, exact in a float (the lowest output
    executes; ties in 48 bits are as unlikely as they are invisible on a page)."""
    return int.from_bytes(output[:6], "big") / 2.0**48


def describe_election(request_id: bytes, epoch_seed: bytes, bids: Sequence[Bid], executor: str | None,
                      verifiers: Sequence[str] = (), excluded: Collection[bytes] = ()) -> dict[str, Any]:
    """The ranking re-derived from the bids: every VRF proof verified again, right here. ``excluded``: the
    keys a signed ``BidSet`` leaves out of the election (the client's ledger excluded them, openly)."""
    eligible = {b.public_key for b in bids} - set(excluded) if excluded else None
    result = elect(request_id, epoch_seed, list(bids), eligible=eligible)
    # a key the client's signed set excludes openly is no invalid bid: it is left out, and counted apart
    invalid = [r for r in result.rejected if not (excluded and r.reason == NOT_ELIGIBLE)]
    ranking = []
    for rank, ranked in enumerate(result.ranking):
        peer_id = peer_id_from_public_key(ranked.public_key)
        ranking.append({"peer_id": peer_id, "rank": rank, "output": ranked.output[:8].hex(),
                        "position": round(vrf_position(ranked.output), 6),
                        "role": "executor" if peer_id == executor else "verifier" if peer_id in verifiers else "bidder"})
    first = ranking[0]["peer_id"] if ranking else None
    return {
        "proof": "checked" if not invalid else "invalid-bids",
        "bids": len(bids),
        "excluded": len(result.rejected) - len(invalid),
        "invalid_bids": [{"reason": r.reason, "detail": r.detail[:120]} for r in invalid],
        "ranking": ranking,
        # the executor ranked first (the usual case) or later after failovers; anything else is worth a look
        "executor_rank": next((r["rank"] for r in ranking if r["peer_id"] == executor), None),
        "first": first,
    }


class ElectionCache:
    """Re-checked elections by request and executor: the page polls every two seconds, and an election's
    bids never change, so each is verified once (bounded: the oldest are forgotten)."""

    def __init__(self, size: int = 4 * RECENT_REQUESTS) -> None:
        self.size = size
        self._done: dict[tuple[bytes, str | None, tuple[str, ...]], dict[str, Any]] = {}
        self._lock = threading.Lock()  # pages are built in worker threads, possibly two at once

    def cached(self, request_id: bytes, executor: str | None, verifiers: Sequence[str] = ()) -> dict[str, Any] | None:
        with self._lock:
            return self._done.get((request_id, executor, tuple(verifiers)))

    def describe(self, request_id: bytes, epoch_seed: bytes, bids: Sequence[Bid], executor: str | None,
                 verifiers: Sequence[str] = (), excluded: Collection[bytes] = ()) -> dict[str, Any]:
        key = (request_id, executor, tuple(verifiers))  # the roles differ by view: a bidder knows no verifiers
        found = self.cached(request_id, executor, verifiers)
        if found is None:
            found = describe_election(request_id, epoch_seed, bids, executor, verifiers, excluded)
            with self._lock:
                self._done[key] = found
                while len(self._done) > self.size:
                    del self._done[next(iter(self._done))]
        return found


def describe_verdicts(verdicts: Iterable[Any], verifiers: Sequence[str]) -> list[dict[str, Any]]:
    """One row per verifier asked: its signed verdict (accept / reject, full reason) or "no verdict"."""
    by_peer: dict[str, Any] = {}
    for signed in verdicts:
        by_peer.setdefault(peer_id_from_public_key(signed.signer), signed.message)
    rows = []
    for peer_id in verifiers:
        v = by_peer.get(peer_id)
        if v is None:
            rows.append({"peer_id": peer_id, "verdict": "none", "reason": "no verdict counted"})
            continue
        rows.append({"peer_id": peer_id, "verdict": "accept" if v.accept else "reject", "reason": v.reason,
                     "first_bad_position": v.first_bad_position, "max_deviation": v.max_deviation})
    return rows


def checked_receipt_verdicts(receipt: Receipt) -> list[Any]:
    """The verdicts inside a receipt that parse, are validly signed by a verifier it names and are about its
    result; anything else is dropped (a receipt's contents are another party's bytes)."""
    named = set(receipt.verifiers)
    out = []
    for envelope in receipt.verdicts:
        try:
            signed = decode_signed(envelope, expect=Verdict)
        except WireError:
            continue
        v = signed.message
        if signed.signer in named and v.request_id == receipt.request_id and v.result_hash == receipt.result_hash:
            out.append(signed)
    return out


def request_from_gateway(r: GatewayRequest, me: str, cache: ElectionCache) -> dict[str, Any]:
    return {
        "request_id": r.request_id.hex(), "at_ms": r.at_ms, "model": r.model, "role": "client",
        "via": "gateway", "client": me, "executor": r.executor, "tokens": r.tokens, "outcome": r.outcome,
        "election": cache.describe(r.request_id, r.epoch_seed, r.bids, r.executor, r.verifiers),
        "verdicts": describe_verdicts(r.verdicts, r.verifiers),
        "refusals": [{"peer_id": p, "reason": why} for p, why in r.refusals],
    }


def request_from_failure(record: Any, me: str) -> dict[str, Any]:
    """A gateway request that got no result (no capacity, all candidates failed, cancelled): its error code."""
    return {
        "request_id": record.id, "at_ms": record.started_at_ms, "model": record.model, "role": "client",
        "via": "gateway", "client": me, "executor": record.executor or None, "tokens": record.tokens,
        "outcome": record.outcome, "election": {"proof": "none", "ranking": [], "bids": None, "invalid_bids": []},
        "verdicts": [], "refusals": [],
    }


NOT_SEEN = {"proof": "not-seen", "ranking": [], "bids": None, "invalid_bids": []}


def receipt_bid_set(receipt: Receipt) -> BidSet | None:
    """The election inside a receipt: a ``BidSet`` validly signed by the receipt's client for its request, or
    None (absent, unparsable, or someone else's: a receipt's contents are another party's bytes)."""
    if not receipt.bid_set:
        return None
    try:
        signed = decode_signed(receipt.bid_set, expect=BidSet, max_size=MAX_BID_SET_BYTES)
    except WireError:
        return None
    if signed.signer != receipt.client or signed.message.request_id != receipt.request_id:
        return None
    return signed.message


def describe_bid_set(bid_set: BidSet, executor: str | None, verifiers: Sequence[str],
                     cache: ElectionCache) -> dict[str, Any]:
    return cache.describe(bid_set.request_id, bid_set.epoch_seed, bid_set.bids, executor, verifiers,
                          bid_set.excluded)


def request_from_receipt(receipt: Receipt, me: str, model_names: Mapping[bytes, str],
                         elections: Mapping[bytes, "SeenElection"], cache: ElectionCache) -> dict[str, Any]:
    executor = peer_id_from_public_key(receipt.executor)
    verifiers = [peer_id_from_public_key(k) for k in receipt.verifiers]
    election = cache.cached(receipt.request_id, executor, verifiers)
    if election is None:
        # the set this peer received itself, else the one the receipt carries (checked: signed by its client)
        seen = elections.get(receipt.request_id)
        bid_set = seen.bid_set if seen is not None else receipt_bid_set(receipt)
        election = describe_bid_set(bid_set, executor, verifiers, cache) if bid_set is not None else NOT_SEEN
    return {
        "request_id": receipt.request_id.hex(), "at_ms": receipt.issued_at_ms,
        "model": model_names.get(receipt.model, receipt.model.hex()[:16]),
        "role": "executor" if executor == me else "verifier" if me in verifiers else "named",
        "via": "receipt", "client": peer_id_from_public_key(receipt.client), "executor": executor,
        "tokens": receipt.output_tokens, "outcome": receipt.outcome, "election": election,
        "verdicts": describe_verdicts(checked_receipt_verdicts(receipt), verifiers), "refusals": [],
    }


def request_from_election(seen: "SeenElection", me: str, model_names: Mapping[bytes, str],
                          cache: ElectionCache) -> dict[str, Any]:
    """A request this peer bid on (or executed) and holds no receipt for: the client's signed election, ranked
    and every proof re-checked; the outcome is unknown here (receipts go to the executor and verifiers)."""
    s = seen.bid_set
    executor = me if seen.executed else None
    return {
        "request_id": s.request_id.hex(), "at_ms": s.issued_at_ms,
        "model": model_names.get(seen.model, seen.model.hex()[:16]),
        "role": "executor" if seen.executed else "bidder", "via": "bid-set",
        "client": peer_id_from_public_key(seen.client), "executor": executor, "tokens": None,
        "outcome": "unknown", "election": describe_bid_set(s, executor, (), cache), "verdicts": [], "refusals": [],
    }


def ledger_view(ledger: "Ledger", me: bytes) -> dict[str, Any]:
    """This peer's credits and penalties and its balance after each of its last entries (blocking: SQLite)."""
    credits, penalties = ledger.totals(me)
    balance = credits - penalties
    recent = ledger.recent_entries(me, LEDGER_SERIES_POINTS)
    running = balance - sum(e.amount for e in recent)
    series = []
    for e in recent:
        running += e.amount
        series.append({"at_ms": e.at_ms, "balance": running})
    return {
        "unit": CREDIT_UNIT, "about": CREDIT_DOC, "credits": credits, "penalties": penalties, "balance": balance,
        "series": series,
        "entries": [{"at_ms": e.at_ms, "kind": e.kind, "amount": e.amount, "request_id": e.request_id.hex(),
                     "note": e.note} for e in reversed(recent[-LEDGER_RECENT_ENTRIES:])],
    }


def receipts_view(ledger: "Ledger", limit: int = RECENT_REQUESTS) -> list[Receipt]:
    """The most recent receipts in the ledger (blocking: SQLite); they were validated when stored."""
    out = []
    for envelope in ledger.recent_receipts(limit):
        try:
            out.append(decode_signed(envelope, expect=Receipt).message)
        except WireError:
            continue
    return out


def address_scope(addrs: Iterable[str]) -> str:
    """The widest kind of address a peer announces: ``public``, ``relayed`` (only through a relay),
    ``private`` (LAN), ``loopback`` or ``none``; what others can hope to dial."""
    import ipaddress

    kinds = set()
    for addr in addrs:
        if "/p2p-circuit" in addr:
            kinds.add("relayed")
            continue
        parts = addr.split("/")
        if len(parts) > 2 and parts[1] in ("dns", "dns4", "dns6"):
            kinds.add("public")
            continue
        if len(parts) < 3 or parts[1] not in ("ip4", "ip6"):
            continue
        try:
            ip = ipaddress.ip_address(parts[2])
        except ValueError:
            continue
        kinds.add("loopback" if ip.is_loopback else "private" if ip.is_private or ip.is_link_local else "public")
    for kind in ("public", "relayed", "private", "loopback"):
        if kind in kinds:
            return kind
    return "none"


def peers_view(node: Any, server: Any) -> list[dict[str, Any]]:
    """This peer first, then every peer with a live announcement (departed ones drop out as theirs expire).

    Reads the node's tables: call it on the event loop. ``reputation`` is filled in by :func:`reputations`.
    """
    now = now_ms()
    connected = set(node.connected_peers())
    me: dict[str, Any] = {
        "peer_id": node.peer_id, "you": True, "role": node.config.role, "reachability": "self",
        "models": [{"name": m.name, "digest": d.hex()} for d, m in server.models.items()] if server else [],
        "free_slots": server.free_slots if server else None, "total_slots": server.slots if server else None,
        "reputation": None, "addrs": list(node.addrs), "addresses": address_scope(node.addrs),
    }
    peers = [me]
    for a in sorted(node.table.live(now), key=lambda a: a.peer_id):
        if a.peer_id == node.peer_id or is_departed_client(a, connected):
            continue
        peers.append({
            "peer_id": a.peer_id, "you": False, "role": "peer" if a.models else "client",
            "reachability": "connected" if a.peer_id in connected else "gossip only",
            "models": [{"name": m.name, "digest": m.digest.hex()} for m in a.models],
            "free_slots": a.free_slots, "total_slots": a.total_slots, "reputation": None,
            "addrs": list(a.addrs), "addresses": address_scope(a.addrs),
        })
    return peers


def reputations(ledger: "Ledger", peer_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Each peer's standing in this peer's ledger (blocking: SQLite)."""
    from ..identity import public_key_from_peer_id

    now = now_ms()
    out = {}
    for peer_id in peer_ids:
        standing = ledger.standing(public_key_from_peer_id(peer_id), now_ms=now)
        out[peer_id] = {"score": round(standing.score, 3), "excluded": standing.excluded,
                        "proven_fraud": standing.proven_fraud}
    return out


def model_names(node: Any, server: Any) -> dict[bytes, str]:
    names: dict[bytes, str] = {}
    for a in node.table.live(now_ms()):
        for m in a.models:
            names.setdefault(m.digest, m.name)
    if server is not None:
        for digest, model in server.models.items():
            names.setdefault(digest, model.name)
    return names


def merge_requests(from_gateway: Iterable[dict[str, Any]], from_receipts: Iterable[dict[str, Any]],
                   from_elections: Iterable[dict[str, Any]] = (), limit: int = RECENT_REQUESTS) -> list[dict[str, Any]]:
    """Newest first, one row per request: the gateway's own view wins (it saw the whole election), then a
    receipt's (it has the outcome), then a bare election (a bidder's view)."""
    rows: dict[str, dict[str, Any]] = {}
    for row in from_gateway:
        rows[row["request_id"]] = row
    for row in (*from_receipts, *from_elections):
        rows.setdefault(row["request_id"], row)
    return sorted(rows.values(), key=lambda r: r["at_ms"], reverse=True)[:limit]
