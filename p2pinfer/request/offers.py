"""Pipeline stage 1, offer and election: offer the request, collect VRF bids, elect, tell every bidder.

1. candidates: live capacity announcements for the model (plus DHT providers), capped by rendezvous hashing;
2. a signed ``TaskOffer`` to each candidate over ``/p2pinfer/bid/1``; each answers ``VrfBid`` or ``Refusal``;
3. :func:`p2pinfer.election.elect` verifies every proof and ranks the bidders this client's ledger does not
   exclude;
4. the client signs the final, complete bid set (``BidSet``: every valid bid, and the keys it excludes) and
   sends it to every bidder before anything runs, so a bidder whose bid is omitted or altered holds signed
   evidence of it; the executor requires the same signed set (:mod:`p2pinfer.request.evidence`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Collection, Sequence

import trio

from ..election import ElectionResult, elect
from ..identity import Identity, peer_id_from_public_key
from ..log import get_logger
from ..net import NetError, Node
from ..wire import (Bid, BidSet, Refusal, Request, Signed, TaskOffer, VrfBid, WireError, decode_signed,
                    encode_signed, now_ms, sign)
from .bid_window import GRACE_S, BidWindow, Closed
from .candidates import select_candidates
from .errors import NoPeerServesModel
from .possession import vet_candidates
from .evidence import ranking_of
from .fanout import send_to_each
from .protocol import (BID_PROTOCOL, BID_SET_PROTOCOL, BID_SET_TIMEOUT_S, MAX_BID_SET_FRAME, MAX_OFFER_FRAME,
                       OFFER_TTL_MS)

log = get_logger("p2pinfer.client")


@dataclass(frozen=True)
class ElectionEvidence:
    """Everything needed to re-check who should have executed: anyone can recompute the ranking."""

    request_id: bytes
    epoch_seed: bytes
    bids: tuple[Bid, ...]
    ranking: tuple[str, ...]  # peer IDs, executor first
    excluded: tuple[str, ...] = ()  # bidders this client left out (its ledger: fraud, rejection, reputation)
    bid_set: Signed[BidSet] | None = None  # the client's signed BidSet every bidder was sent

    def recheck(self) -> ElectionResult:
        """The ranking anyone recomputes from the signed bid set (its excluded keys left out)."""
        if self.bid_set is not None:
            return ranking_of(self.bid_set.message)
        return elect(self.request_id, self.epoch_seed, self.bids)


@dataclass(frozen=True)
class Bids:
    bids: tuple[Bid, ...]
    any_busy: bool
    closed: Closed = Closed.ALL_ANSWERED  # why the client stopped waiting (bid_window.py)
    silent: tuple[str, ...] = ()          # candidates offered the request that had not answered by then


async def collect_bids(node: Node, identity: Identity, request: Request, request_id: bytes, *, epoch_seed: bytes,
                       max_candidates: int, bid_timeout: float, discovery_timeout: float,
                       enough: int = 1, grace_s: float = GRACE_S) -> Bids:
    """Offer the request to the candidates; returns the bids and whether any candidate said busy.

    Waits until every candidate has answered, or :data:`~p2pinfer.request.bid_window.GRACE_S` after the
    ``enough``-th valid bid (executor + verifiers), or ``bid_timeout``, whichever is first
    (:mod:`p2pinfer.request.bid_window`): a silent or unreachable candidate costs at most the grace period
    once enough honest bids are in."""
    # include_self: a client running on a serving peer's node (the gateway) offers work to that peer too,
    # over a loopback stream; it gets the same equal chance as every other bidder.
    infos = await node.candidates(request.model, timeout=min(discovery_timeout, 5.0), include_self=True)
    infos = await vet_candidates(node, identity, request.model, infos, enough=enough)  # possession (Sybils), docs/network.md
    if not infos:
        raise NoPeerServesModel(f"no peer with free capacity serves model {request.model.hex()[:16]}…")
    chosen = select_candidates(request_id, [i.peer_id for i in infos], max_candidates)
    offer = TaskOffer(request_id=request_id, model=request.model, max_tokens=request.max_tokens,
                      epoch_seed=epoch_seed, expires_at_ms=now_ms() + OFFER_TTL_MS)
    offer_bytes = encode_signed(identity, offer)
    bids: list[Bid] = []
    busy: list[str] = []

    async def ask(peer_id: str) -> bool:
        """Ask one candidate; True when it answered with a bid that counts."""
        try:
            reply = await node.request(peer_id, BID_PROTOCOL, offer_bytes, timeout=bid_timeout,
                                       max_frame=MAX_OFFER_FRAME)
            signed = decode_signed(reply, expect=(VrfBid, Refusal), max_size=MAX_OFFER_FRAME)
        except (NetError, WireError) as exc:
            log.info("bid.failed", peer_id=peer_id, error=str(exc)[:200])
            return False
        if signed.signer_peer_id != peer_id:
            log.warning("bid.rejected", peer_id=peer_id, reason="signer is not the peer we asked")
            return False
        message = signed.message
        if isinstance(message, Refusal):
            log.debug("bid.refused", peer_id=peer_id, code=message.code, message=message.message)
            if message.code == "busy":
                busy.append(peer_id)
            return False
        if message.bid.public_key != signed.signer or message.bid.request_id != request_id:
            log.warning("bid.rejected", peer_id=peer_id, reason="bid names another key or request")
            return False
        bids.append(message.bid)
        return True

    window = BidWindow(candidates=len(chosen), enough=max(1, enough), opened_at=trio.current_time(),
                       timeout_s=bid_timeout, grace_s=grace_s)
    pending = set(chosen)
    wake = [trio.Event()]

    async def answer_of(peer_id: str) -> None:
        valid = await ask(peer_id)
        pending.discard(peer_id)
        window.record(trio.current_time(), valid=valid)
        wake[0].set()

    async with trio.open_nursery() as nursery:
        for peer_id in chosen:
            nursery.start_soon(answer_of, peer_id)
        while trio.current_time() < window.close_at():
            wake[0] = trio.Event()
            with trio.move_on_at(window.close_at()):
                await wake[0].wait()
        closed = window.reason(trio.current_time())
        silent = tuple(sorted(pending))
        nursery.cancel_scope.cancel()  # the silent ones: their bids would come too late to count
    log.debug("election.closed", request_id=request_id.hex()[:16], reason=closed.value, bids=len(bids),
              candidates=len(chosen), silent=len(silent))
    return Bids(tuple(bids), bool(busy), closed, silent)


def hold_election(identity: Identity, request_id: bytes, epoch_seed: bytes, bids: Sequence[Bid],
                  excluded: Collection[bytes], *, verifiers: int) -> tuple[ElectionResult, ElectionEvidence]:
    """Rank the bids this client does not exclude and sign the bid set that states it.

    Every proof is verified once: the excluded keys are then taken out of the ranking, which is exactly what
    ``elect`` computes with them not eligible (the ranking is a sort by VRF output).
    """
    checked = elect(request_id, epoch_seed, bids, verifiers=verifiers)
    for rejection in checked.rejected:
        log.info("election.bid_rejected", request_id=request_id.hex()[:16], reason=rejection.reason,
                 detail=rejection.detail)
    valid = checked.accepted  # the set carries only bids anyone can check
    left_out = tuple(sorted(set(excluded) & {b.public_key for b in valid}))
    kept = [(r, b) for r, b in zip(checked.ranking, checked.accepted) if r.public_key not in left_out]
    election = replace(checked, ranking=tuple(r for r, _ in kept), accepted=tuple(b for _, b in kept))
    bid_set = sign(identity, BidSet(request_id=request_id, epoch_seed=epoch_seed,
                                    bids=tuple(sorted(valid, key=lambda b: b.public_key)), excluded=left_out,
                                    issued_at_ms=now_ms()))
    ranking = tuple(peer_id_from_public_key(r.public_key) for r in election.ranking)
    evidence = ElectionEvidence(request_id, epoch_seed, bid_set.message.bids, ranking,
                                tuple(sorted(peer_id_from_public_key(k) for k in left_out)), bid_set)
    return election, evidence


async def announce_bid_set(node: Node, bid_set: Signed[BidSet], timeout: float = BID_SET_TIMEOUT_S) -> int:
    """Send the signed bid set to every bidder at once, before execution; returns how many took it."""
    return await send_to_each(node, BID_SET_PROTOCOL, bid_set.to_bytes(), (b.public_key for b in bid_set.message.bids),
                              timeout=timeout, max_frame=MAX_BID_SET_FRAME, grace=0.5,
                              undelivered_event="bid_set.undelivered")
